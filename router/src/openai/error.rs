//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` with
//! the HTTP status their SDKs map to exception classes. The one place where a `tonic::Status`
//! of the shared generation path becomes an HTTP answer.

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
        }
    }

    /// The error of the shared generation path; `param` turns a field of `onehead.v1`
    /// (`max_new_tokens`) into the request's own (`max_tokens`), in the message too.
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
        ApiError { status: code, message, kind, param: field, code: error_code }
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
        (self.status, axum::Json(self.body())).into_response()
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
}
