//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` with
//! the HTTP status their SDKs map to exception classes. The one place where a `tonic::Status`
//! of the shared generation path becomes an HTTP answer, and where an HTTP status gets the code
//! that `onehead_router_requests_total` counts it under.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::{Code, Status};

/// An error answer.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    /// The request field at fault, by its OpenAI name.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// The shared path counted the request already (it ended there with this error).
    pub counted: bool,
}

/// A response extension: the request is counted already, by the shared path. The HTTP API
/// counts every response without it (`openai::count`).
#[derive(Clone, Copy, Debug)]
pub struct Counted;

/// The code an HTTP status is counted under: the inverse of `ApiError::from_status`. A body
/// over the limit (413) is RESOURCE_EXHAUSTED, as gRPC answers an oversized message; a method a
/// path does not take (405) is UNIMPLEMENTED, as gRPC answers a method a service lacks.
pub fn code_of(status: StatusCode) -> Code {
    match status {
        s if s.is_success() => Code::Ok,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::Unimplemented,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

impl ApiError {
    /// 400 for `param`.
    pub fn invalid(param: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid argument `{param}`: {message}"),
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
            counted: false,
        }
    }

    /// 401.
    pub fn unauthenticated(message: &str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_owned(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            counted: false,
        }
    }

    /// 404 for a model this router does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{asked}` does not exist: this router serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            counted: false,
        }
    }

    /// One of axum's own refusals, `status` for `method path`: a path the API lacks (404), a
    /// method its path does not take (405), a body over `body_limit_bytes` (413).
    pub fn refusal(status: StatusCode, method: &str, path: &str, body_limit_bytes: usize) -> Self {
        let served = "GET /v1/models, POST /v1/completions and POST /v1/chat/completions";
        let (message, code) = match status {
            StatusCode::NOT_FOUND => (format!("no route for {method} {path}: this API serves {served}"), "not_found"),
            StatusCode::METHOD_NOT_ALLOWED => {
                (format!("{path} does not take {method}: this API serves {served}"), "method_not_allowed")
            }
            StatusCode::PAYLOAD_TOO_LARGE => (
                format!(
                    "the request body is over the limit of {body_limit_bytes} bytes (6 x --max-prompt-bytes + 64 KiB)"
                ),
                "request_too_large",
            ),
            _ => (format!("{method} {path}: {status}"), "invalid_request"),
        };
        ApiError { status, message, kind: "invalid_request_error", param: None, code: Some(code), counted: false }
    }

    /// The status a generation ended with on the shared path (from `Router::start` or in its
    /// events), which counted it.
    pub fn from_shared(status: &Status, param: impl Fn(&str) -> &str) -> Self {
        ApiError { counted: true, ..Self::from_status(status, param) }
    }

    /// Events that ended without a result: the generation's task ended without counting it.
    pub fn no_result() -> Self {
        Self::from_status(&Status::internal("generation ended without a result"), |f| f)
    }

    /// The answer for `status`, not counted yet (see `from_shared`); `param` turns a field of
    /// `onehead.v1` (`max_new_tokens`) into the request's own (`max_tokens`), in the message too.
    pub fn from_status(status: &Status, param: impl Fn(&str) -> &str) -> Self {
        let (code, kind, error_code) = match status.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key")),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded")),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let mut message = status.message().to_owned();
        let mut field = None;
        // "invalid argument `FIELD`: why", as `validate::Invalid` writes it.
        if let Some(rest) = message.strip_prefix("invalid argument `")
            && let Some((name, why)) = rest.split_once("`: ")
        {
            let name = param(name).to_owned();
            message = format!("invalid argument `{name}`: {why}");
            field = Some(name);
        }
        ApiError { status: code, message, kind, param: field, code: error_code, counted: false }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.counted {
            response.extensions_mut().insert(Counted);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Status, expected: (u16, &str, Option<&str>)) {
        let e = ApiError::from_status(&status, |f| if f == "max_new_tokens" { "max_tokens" } else { f });
        assert_eq!((e.status.as_u16(), e.message.as_str(), e.param.as_deref()), expected);
    }

    #[test]
    fn statuses_map_to_openai_errors_naming_the_field() {
        check(
            Status::invalid_argument("invalid argument `max_new_tokens`: 101 is over the limit of 100"),
            (400, "invalid argument `max_tokens`: 101 is over the limit of 100", Some("max_tokens")),
        );
        check(
            Status::invalid_argument("invalid argument `top_p`: x"),
            (400, "invalid argument `top_p`: x", Some("top_p")),
        );
        check(Status::unauthenticated("wrong API key"), (401, "wrong API key", None));
        check(Status::resource_exhausted("at capacity"), (429, "at capacity", None));
        check(Status::unavailable("no healthy worker"), (503, "no healthy worker", None));
        check(Status::deadline_exceeded("late"), (504, "late", None));
        check(Status::internal("boom"), (500, "boom", None));
    }

    #[test]
    fn each_status_is_counted_under_the_code_it_came_from() {
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::NotFound,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
        ] {
            assert_eq!(code_of(ApiError::from_status(&Status::new(code, "x"), |f| f).status), code);
        }
        assert_eq!(code_of(ApiError::unknown_model("a", "b").status), Code::NotFound);
        assert_eq!(code_of(StatusCode::OK), Code::Ok);
        assert_eq!(code_of(StatusCode::PAYLOAD_TOO_LARGE), Code::ResourceExhausted);
        assert_eq!(code_of(StatusCode::METHOD_NOT_ALLOWED), Code::Unimplemented);
        assert_eq!(code_of(StatusCode::UNSUPPORTED_MEDIA_TYPE), Code::InvalidArgument);
    }

    #[test]
    fn refusals_keep_their_status_and_say_what_was_refused() {
        let refusal = |status: StatusCode| ApiError::refusal(status, "GET", "/v1/completions", 1000);
        let not_found = refusal(StatusCode::NOT_FOUND);
        assert_eq!((not_found.status, not_found.code), (StatusCode::NOT_FOUND, Some("not_found")));
        assert!(not_found.message.starts_with("no route for GET /v1/completions"), "{}", not_found.message);
        assert!(refusal(StatusCode::METHOD_NOT_ALLOWED).message.contains("does not take GET"));
        assert!(refusal(StatusCode::PAYLOAD_TOO_LARGE).message.contains("limit of 1000 bytes"));
        assert_eq!(refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE).status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn only_errors_of_the_shared_path_are_marked_counted() {
        let counted = |e: ApiError| e.into_response().extensions().get::<Counted>().is_some();
        assert!(counted(ApiError::from_shared(&Status::unavailable("x"), |f| f)));
        assert!(!counted(ApiError::from_status(&Status::unavailable("x"), |f| f)));
        assert!(!counted(ApiError::no_result()));
        assert!(!counted(ApiError::unauthenticated("x")));
    }
}
