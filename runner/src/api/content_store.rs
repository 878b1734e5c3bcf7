//! The ContentStore service: blobs the caller may read, uploads that grant it theirs.

use std::pin::Pin;

use agent_proto::v1::content_store_server::ContentStore as ContentStoreApi;
use agent_proto::v1::{
    write_request, FindMissingRequest, FindMissingResponse, ReadRequest, ReadResponse,
    WriteRequest, WriteResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::audit::audited;
use crate::api::auth::principal;
use crate::api::service::{blocking, Service};
use crate::error::RunnerError;
use crate::store::cas::check_digest;

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentStoreApi for Service {
    async fn find_missing(
        &self,
        request: Request<FindMissingRequest>,
    ) -> Result<Response<FindMissingResponse>, Status> {
        let caller = principal(&request)?;
        let digests = request.into_inner().digests;
        if digests.len() > 100_000 {
            return Err(RunnerError::invalid("digests", "too many").into());
        }
        let runner = self.runner.clone();
        let missing = blocking(move || {
            for (i, digest) in digests.iter().enumerate() {
                check_digest(&format!("digests[{i}]"), digest)?;
            }
            // A blob the caller may not read counts as missing: it proves it holds the
            // content by uploading it, and learns nothing of other clients' files.
            let readable = if caller.admin {
                None
            } else {
                Some(
                    runner
                        .db
                        .readable_blobs(&caller.owner_keys(), digests.iter().map(String::as_str))?,
                )
            };
            let mut missing = Vec::new();
            for digest in digests {
                let may_read = readable.as_ref().is_none_or(|r| r.contains(&digest));
                if !may_read || !runner.cas.contains(&digest)? {
                    missing.push(digest);
                }
            }
            Ok(missing)
        })
        .await?;
        Ok(Response::new(FindMissingResponse { missing }))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = principal(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(WriteRequest {
                part: Some(write_request::Part::Header(header)),
            }) => header,
            _ => {
                return Err(
                    RunnerError::invalid("header", "the first message must be a header").into(),
                )
            }
        };
        check_digest("header.digest", &header.digest)?;
        let max_blob_size = self.runner.config.max_blob_size.0;
        if header.size > max_blob_size {
            return Err(RunnerError::invalid(
                "header.size",
                format!(
                    "{} bytes declared, more than the runner's max_blob_size of {}",
                    header.size,
                    crate::units::format_size(max_blob_size)
                ),
            )
            .into());
        }
        // Refused before a byte is received when the disk cannot take it.
        self.runner.cas.check_room(header.size)?;
        let mut writer = self.runner.cas.writer()?;
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(write_request::Part::Data(data)) => {
                    if writer.size() + data.len() as u64 > header.size {
                        return Err(RunnerError::invalid(
                            "data",
                            format!("more than the declared {} bytes", header.size),
                        )
                        .into());
                    }
                    writer = blocking(move || {
                        writer.write(&data)?;
                        Ok(writer)
                    })
                    .await?;
                }
                _ => return Err(RunnerError::invalid("data", "a second header").into()),
            }
        }
        if writer.size() != header.size {
            return Err(RunnerError::invalid(
                "data",
                format!("{} bytes received, {} declared", writer.size(), header.size),
            )
            .into());
        }
        let size = writer.size();
        let expected = header.digest.clone();
        let runner = self.runner.clone();
        let digest = blocking(move || {
            let digest = writer.commit(Some(&expected))?;
            runner.db.grant_blob(&caller.owner, &digest)?;
            Ok(digest)
        })
        .await?;
        Ok(Response::new(WriteResponse { digest, size }))
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = principal(&request)?;
        let digest = request.into_inner().digest;
        check_digest("digest", &digest)?;
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let mut reader = blocking(move || {
            let open = || {
                let may_read = caller.admin
                    || runner
                        .db
                        .readable_blobs(&caller.owner_keys(), [digest.as_str()])?
                        .contains(&digest);
                if !may_read {
                    return Err(RunnerError::NotFound(format!("blob {digest}")));
                }
                runner.cas.reader(&digest)
            };
            let opened = open();
            audited(
                &audit,
                &caller,
                "blob.read",
                format!("blob:{digest}"),
                opened,
            )
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Each chunk is read on a blocking thread of its own, taken only for that read: a
        // slow reader holds a task, not a thread. One chunk is held back until the next
        // read, so the last goes out only after the whole content matched its digest: a
        // corrupt blob ends in an error, never taken for the real content.
        tokio::spawn(async move {
            let mut held: Option<Vec<u8>> = None;
            loop {
                let read = tokio::task::spawn_blocking(move || {
                    let next = reader.next_chunk();
                    (reader, next)
                })
                .await;
                let (back, next) = match read {
                    Ok(pair) => pair,
                    Err(e) => {
                        let err = RunnerError::Internal(format!("reading a blob: {e}"));
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                reader = back;
                match next {
                    Ok(next) => {
                        let done = next.is_none();
                        if let Some(data) = std::mem::replace(&mut held, next) {
                            if tx.send(Ok(ReadResponse { data })).await.is_err() {
                                return;
                            }
                        }
                        if done {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
