//! How a setup step of the sandbox fails: the layer it belongs to and what happened, so
//! the step's outcome names the layer.

/// A failed setup step: the layer it belongs to and what happened.
#[derive(Debug)]
pub(crate) struct Failure {
    pub layer: &'static str,
    pub message: String,
}

pub(crate) fn fail(layer: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        layer,
        message: message.into(),
    }
}

/// `.layer("mount", "what")?` turns any displayable error into a [`Failure`].
pub(crate) trait OrLayer<T> {
    fn layer(self, layer: &'static str, what: &str) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> OrLayer<T> for Result<T, E> {
    fn layer(self, layer: &'static str, what: &str) -> Result<T, Failure> {
        self.map_err(|e| fail(layer, format!("{what}: {e}")))
    }
}
