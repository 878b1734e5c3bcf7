//! The protobuf codec of kiln.v1: prost's, except that bytes which do not decode (a
//! malformed message, a string that is not UTF-8) are the sender's error,
//! INVALID_ARGUMENT, not INTERNAL, which Kiln keeps for its own bugs.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

#[derive(Debug, Clone)]
pub struct KilnCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for KilnCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for KilnCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = KilnDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        KilnDecoder { _type: PhantomData }
    }
}

#[derive(Debug, Clone)]
pub struct KilnDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for KilnDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))
    }
}
