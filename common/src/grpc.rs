//! The classical channel's errors as gRPC statuses, and back: the transport side of
//! [`LinkError`] (the core knows nothing of tonic). Free functions, because neither type is
//! defined here.

use tonic::{Code, Status};

use qkd_core::link::LinkError;

/// The gRPC status Alice's service answers for `error`.
pub fn status_from_link_error(error: LinkError) -> Status {
    match error {
        LinkError::State(m) => Status::failed_precondition(m),
        e @ LinkError::Phase { .. } => Status::failed_precondition(e.to_string()),
        LinkError::Malformed(m) => Status::invalid_argument(m),
        LinkError::ParamsMismatch(m) => Status::failed_precondition(format!("protocol parameters differ: {m}")),
        LinkError::Store(e) => Status::unavailable(e.to_string()),
        LinkError::Transport(m) | LinkError::Refused(m) => Status::unavailable(m),
    }
}

/// The link error Bob sees when a call to Alice fails with `status`: a transport failure (worth
/// reconnecting) or a refusal.
pub fn link_error_from_status(status: Status) -> LinkError {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            LinkError::Transport(status.message().to_owned())
        }
        _ => LinkError::Refused(format!("{:?}: {}", status.code(), status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qkd_core::link::alice::{BlockPhase, BlockRequest};

    #[test]
    fn each_link_error_maps_to_its_status_and_back() {
        let cases = [
            (LinkError::State("no session".into()), Code::FailedPrecondition),
            (
                LinkError::Phase {
                    block_id: uuid::Uuid::nil(),
                    request: BlockRequest::Amplify,
                    expected: BlockPhase::Verified,
                    actual: BlockPhase::Reconciling,
                },
                Code::FailedPrecondition,
            ),
            (LinkError::Malformed("bad".into()), Code::InvalidArgument),
            (LinkError::ParamsMismatch("p_z".into()), Code::FailedPrecondition),
            (LinkError::Transport("gone".into()), Code::Unavailable),
            (LinkError::Refused("no".into()), Code::Unavailable),
        ];
        for (error, code) in cases {
            let status = status_from_link_error(error);
            assert_eq!(status.code(), code);
        }
        assert!(matches!(link_error_from_status(Status::unavailable("down")), LinkError::Transport(m) if m == "down"));
        assert!(matches!(link_error_from_status(Status::deadline_exceeded("slow")), LinkError::Transport(_)));
        assert!(
            matches!(link_error_from_status(Status::failed_precondition("x")), LinkError::Refused(m) if m == "FailedPrecondition: x")
        );
    }
}
