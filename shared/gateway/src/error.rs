//! [`GatewayError`] and the one place where errors become HTTP statuses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use skein_proto::ErrorCode;

/// Seconds a client is told to wait (`Retry-After`) when the mesh or the gateway is busy.
const RETRY_AFTER_S: u32 = 1;

/// Why an HTTP request failed. Every variant becomes a status and a `{"error": "..."}` body in
/// [`GatewayError::status`] and [`IntoResponse`], and nowhere else.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The request is malformed: bad JSON, an unknown datatype, data that does not fit the shape
    /// or datatype, binary sizes that disagree with the body.
    #[error("{0}")]
    BadRequest(String),
    /// The body, or what it decompresses to, is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The `Content-Encoding` of the body is not one the gateway decodes.
    #[error("unsupported Content-Encoding `{0}` (use gzip, deflate or identity)")]
    UnsupportedEncoding(String),
    /// No such model, version or path.
    #[error("{0}")]
    NotFound(String),
    /// The path exists but not for this method.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// The server or the model is not ready (the V2 API answers 4xx for "not ready").
    #[error("{0}")]
    NotReady(String),
    /// The gateway already has its maximum number of inference requests in flight.
    #[error("the gateway has {0} inference requests in flight; retry shortly")]
    Busy(usize),
    /// This API key sent more inference requests than the gateway's per-key rate allows;
    /// the next is allowed after the duration given.
    #[error("this API key is over the gateway's request rate; retry in {0:?}")]
    RateLimited(std::time::Duration),
    /// The body did not arrive within the configured time.
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// The `Authorization` header is not `Bearer <API key>`.
    #[error("{0}")]
    Unauthorized(String),
    /// Something failed inside the gateway itself (not the client's doing).
    #[error("internal gateway error: {0}")]
    Internal(String),
    /// The mesh answered with an error, or could not be reached.
    #[error(transparent)]
    Mesh(#[from] skein_client::Error),
}

impl From<skein_v2::V2Error> for GatewayError {
    fn from(e: skein_v2::V2Error) -> Self {
        use skein_v2::V2Error;
        match e {
            V2Error::BadRequest(m) => GatewayError::BadRequest(m),
            V2Error::PayloadTooLarge { limit } => GatewayError::PayloadTooLarge { limit },
            V2Error::UnsupportedEncoding(c) => GatewayError::UnsupportedEncoding(c),
            V2Error::Internal(m) => GatewayError::Internal(m),
            // `V2Error` is non-exhaustive: a variant added there is an internal error here until
            // it gets a status of its own.
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

impl GatewayError {
    /// The HTTP status of this error. The mapping of mesh error codes lives here, once.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::NotReady(_) => StatusCode::BAD_REQUEST,
            GatewayError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Mesh(e) => match e {
                // Coordinator or node unreachable (after failover): the mesh is unavailable.
                skein_client::Error::Transport(_) => StatusCode::SERVICE_UNAVAILABLE,
                other => match other.code() {
                    Some(code) => status_of_code(code),
                    None => StatusCode::INTERNAL_SERVER_ERROR,
                },
            },
        }
    }

    /// `Retry-After` seconds, for the statuses that invite a retry (the mesh's own hint when
    /// it gave one, rounded up).
    pub fn retry_after(&self) -> Option<u32> {
        let status = self.status();
        if status != StatusCode::SERVICE_UNAVAILABLE && status != StatusCode::TOO_MANY_REQUESTS {
            return None;
        }
        let hint = match self {
            GatewayError::Mesh(skein_client::Error::Remote(e)) => e.retry_after_ms,
            GatewayError::RateLimited(wait) => Some(wait.as_millis() as u64),
            _ => None,
        };
        Some(hint.map_or(RETRY_AFTER_S, |ms| {
            ms.div_ceil(1000).clamp(1, u64::from(u32::MAX)) as u32
        }))
    }
}

/// The HTTP status of a mesh error code.
pub fn status_of_code(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidInput
        | ErrorCode::InvalidTensor
        | ErrorCode::Malformed
        | ErrorCode::HashMismatch => StatusCode::BAD_REQUEST,
        // A model upload the mesh cannot serve (admin REST deploy).
        ErrorCode::InvalidModel | ErrorCode::UnsupportedOperator => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        ErrorCode::UnknownModel | ErrorCode::UnknownVersion => StatusCode::NOT_FOUND,
        ErrorCode::Overloaded | ErrorCode::NoCapacity | ErrorCode::ShuttingDown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::FrameTooLarge | ErrorCode::UploadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthenticated | ErrorCode::InvalidTicket | ErrorCode::TicketOfflineExpired => {
            StatusCode::UNAUTHORIZED
        }
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Conflict | ErrorCode::VersionConflict => StatusCode::CONFLICT,
        ErrorCode::NotFound | ErrorCode::UnknownNode => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"skein\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::WireError;

    fn mesh(code: ErrorCode) -> GatewayError {
        GatewayError::Mesh(skein_client::Error::Remote(WireError::new(code, "x")))
    }

    #[test]
    fn mesh_codes_map_to_the_documented_statuses() {
        let cases = [
            (ErrorCode::InvalidInput, 400),
            (ErrorCode::InvalidTensor, 400),
            (ErrorCode::Malformed, 400),
            (ErrorCode::UnknownModel, 404),
            (ErrorCode::UnknownVersion, 404),
            (ErrorCode::Overloaded, 503),
            (ErrorCode::NoCapacity, 503),
            (ErrorCode::ShuttingDown, 503),
            (ErrorCode::DeadlineExceeded, 504),
            (ErrorCode::FrameTooLarge, 413),
            (ErrorCode::Unauthenticated, 401),
            (ErrorCode::InvalidTicket, 401),
            (ErrorCode::TicketOfflineExpired, 401),
            (ErrorCode::Forbidden, 403),
            (ErrorCode::QuotaExceeded, 429),
            (ErrorCode::Conflict, 409),
            (ErrorCode::NotFound, 404),
            (ErrorCode::HashMismatch, 400),
            (ErrorCode::InvalidModel, 422),
            (ErrorCode::UnsupportedOperator, 422),
            (ErrorCode::Internal, 500),
            (ErrorCode::ModelLoadFailed, 500),
        ];
        for (code, status) in cases {
            let e = mesh(code);
            assert_eq!(e.status().as_u16(), status, "{code}");
            assert_eq!(
                e.retry_after().is_some(),
                status == 503 || status == 429,
                "{code}"
            );
        }
        let t = GatewayError::Mesh(skein_client::Error::Timeout(std::time::Duration::ZERO));
        assert_eq!(t.status().as_u16(), 504);
        let t = GatewayError::Mesh(skein_client::Error::Transport("gone".into()));
        assert_eq!(t.status().as_u16(), 503);
    }

    #[test]
    fn error_bodies_are_json_with_retry_after_on_503() {
        let r = mesh(ErrorCode::Overloaded).into_response();
        assert_eq!(r.status().as_u16(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = GatewayError::BadRequest("no".into()).into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn wire_format_errors_keep_their_status_and_message() {
        use skein_v2::V2Error;
        for e in [
            V2Error::BadRequest("bad shape".into()),
            V2Error::PayloadTooLarge { limit: 10 },
            V2Error::UnsupportedEncoding("br".into()),
            V2Error::Internal("encoding the response: x".into()),
        ] {
            let g = GatewayError::from(e.clone());
            assert_eq!(g.status().as_u16(), e.status(), "{e}");
            assert!(g.to_string().ends_with(&e.to_string()), "{g} / {e}");
        }
    }
}
