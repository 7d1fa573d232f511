//! The owner's answer to a peer header, pure: `EMX1` | status u8 | flags u8 | length u16 |
//! reason (UTF-8, at most [`MAX_REASON`] bytes). Flags are reserved and zero in v1. After OK, the
//! stream's bytes follow at once.

use super::codec::{CodecError, Parse};

/// The longest reason in a status reply (SCALEOUT §4.2).
pub(crate) const MAX_REASON: usize = 512;
const REPLY_FIXED: usize = 8;
/// The longest status reply.
pub(crate) const MAX_REPLY: usize = REPLY_FIXED + MAX_REASON;
const REPLY_MAGIC: &[u8; 4] = b"EMX1";

/// The owner's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    /// The owner serves no such tunnel (any more): try another replica.
    NoRoute,
    /// The tunnel client did not open a channel: nothing was sent to it.
    OpenFailed,
    Busy,
    Draining,
    /// The header's HMAC, time or nonce was refused.
    Auth,
    BadRequest,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::NoRoute => 1,
            Status::OpenFailed => 2,
            Status::Busy => 3,
            Status::Draining => 4,
            Status::Auth => 5,
            Status::BadRequest => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::NoRoute,
            2 => Status::OpenFailed,
            3 => Status::Busy,
            4 => Status::Draining,
            5 => Status::Auth,
            6 => Status::BadRequest,
            _ => return None,
        })
    }

    /// A bounded metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NoRoute => "no_route",
            Status::OpenFailed => "open_failed",
            Status::Busy => "busy",
            Status::Draining => "draining",
            Status::Auth => "auth",
            Status::BadRequest => "bad_request",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) reason: String,
}

/// The reply bytes; a reason longer than [`MAX_REASON`] is cut at a character boundary.
pub(crate) fn encode_reply(status: Status, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(REPLY_FIXED + reason.len());
    out.extend_from_slice(REPLY_MAGIC);
    out.extend_from_slice(&[status.code(), 0]);
    out.extend_from_slice(&u16::try_from(reason.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(reason);
    out
}

/// How many bytes the reply at the start of `buf` needs in all, as far as `buf` tells.
pub(crate) fn reply_wanted(buf: &[u8]) -> usize {
    match buf.get(6..REPLY_FIXED) {
        Some(len) => REPLY_FIXED + usize::from(u16::from_be_bytes([len[0], len[1]])),
        None => REPLY_FIXED,
    }
}

pub(crate) fn parse_reply(buf: &[u8]) -> Parse<Reply> {
    let n = buf.len().min(REPLY_MAGIC.len());
    if buf[..n] != REPLY_MAGIC[..n] {
        return Parse::Invalid(CodecError::Framing("not an EMX1 reply"));
    }
    if buf.len() < REPLY_FIXED {
        return Parse::Incomplete;
    }
    let Some(status) = Status::from_code(buf[4]) else {
        return Parse::Invalid(CodecError::Field("status"));
    };
    if buf[5] != 0 {
        return Parse::Invalid(CodecError::Field("flags"));
    }
    let total = reply_wanted(buf);
    if total > MAX_REPLY {
        return Parse::Invalid(CodecError::TooLong);
    }
    if buf.len() < total {
        return Parse::Incomplete;
    }
    match std::str::from_utf8(&buf[REPLY_FIXED..total]) {
        Ok(reason) => Parse::Complete {
            value: Reply {
                status,
                reason: reason.to_owned(),
            },
            consumed: total,
        },
        Err(_) => Parse::Invalid(CodecError::Field("reason")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ALL: [Status; 7] = [
        Status::Ok,
        Status::NoRoute,
        Status::OpenFailed,
        Status::Busy,
        Status::Draining,
        Status::Auth,
        Status::BadRequest,
    ];

    #[test]
    fn every_prefix_is_incomplete_and_replies_round_trip() {
        for (status, reason) in ALL.iter().zip(["", "no such tunnel", "é", "x", "", "hmac", "op"]) {
            let bytes = encode_reply(*status, reason);
            for n in 0..bytes.len() {
                assert_eq!(parse_reply(&bytes[..n]), Parse::Incomplete, "prefix {n}");
                assert!(reply_wanted(&bytes[..n]) > n);
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"upstream bytes");
            let want = Parse::Complete {
                value: Reply {
                    status: *status,
                    reason: reason.to_owned(),
                },
                consumed: bytes.len(),
            };
            assert_eq!(parse_reply(&longer), want);
            assert_eq!(reply_wanted(&longer), bytes.len());
        }
        assert_eq!(encode_reply(Status::Ok, ""), b"EMX1\0\0\0\0");
        assert_eq!(ALL.map(Status::code), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character() {
        let reason = "é".repeat(MAX_REASON);
        let bytes = encode_reply(Status::OpenFailed, &reason);
        assert_eq!(bytes.len(), MAX_REPLY);
        let Parse::Complete { value, .. } = parse_reply(&bytes) else {
            unreachable!()
        };
        assert_eq!(value.reason, "é".repeat(MAX_REASON / 2));
        let odd = format!("x{reason}");
        let Parse::Complete { value, .. } = parse_reply(&encode_reply(Status::Busy, &odd)) else {
            unreachable!()
        };
        assert_eq!(value.reason.len(), MAX_REASON - 1);
    }

    #[test]
    fn bad_replies_are_refused_early() {
        assert_eq!(
            parse_reply(b"HTTP/1.1 400"),
            Parse::Invalid(CodecError::Framing("not an EMX1 reply"))
        );
        assert_eq!(
            parse_reply(b"EMX2"),
            Parse::Invalid(CodecError::Framing("not an EMX1 reply"))
        );
        assert_eq!(
            parse_reply(b"EMX1\x07\0\0\0"),
            Parse::Invalid(CodecError::Field("status"))
        );
        assert_eq!(
            parse_reply(b"EMX1\0\x01\0\0"),
            Parse::Invalid(CodecError::Field("flags"))
        );
        assert_eq!(
            parse_reply(b"EMX1\x01\0\x02\x01"),
            Parse::Invalid(CodecError::TooLong)
        );
        assert_eq!(
            parse_reply(b"EMX1\x01\0\x02\x00"),
            Parse::Incomplete,
            "512 is allowed"
        );
        assert_eq!(
            parse_reply(b"EMX1\x01\0\0\x01\xff"),
            Parse::Invalid(CodecError::Field("reason"))
        );
    }
}
