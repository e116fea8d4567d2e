//! Framing: each frame is `varint(len) || postcard(Message)`, where `len` is the body length in
//! bytes as an unsigned LEB128 of at most 4 bytes and never above [`MAX_FRAME_LEN`].
//!
//! The length is validated from the prefix alone, so a receiver never reserves memory for a frame
//! it will refuse. The body must decode to exactly one [`Message`] with no trailing bytes.

use crate::{MAX_FRAME_LEN, Message};
use std::fmt;

/// Longest length prefix: 4 LEB128 bytes hold 28 bits, enough for [`MAX_FRAME_LEN`] (2^21).
pub const MAX_PREFIX_LEN: usize = 4;

/// Why a frame was refused. Any of these closes the connection to that peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    TooLong(u64),
    /// The length prefix is malformed (too many bytes, or a non-minimal encoding).
    BadPrefix,
    /// The body is not a valid message.
    Malformed(String),
    /// The body decodes but leaves bytes unread.
    TrailingBytes(usize),
    /// The message breaks a documented limit.
    Limit(&'static str),
    /// The frame length does not match the body (decode_frame only).
    Truncated,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong(n) => write!(
                f,
                "frame of {n} bytes exceeds the {MAX_FRAME_LEN}-byte limit"
            ),
            FrameError::BadPrefix => write!(f, "malformed frame length prefix"),
            FrameError::Malformed(e) => write!(f, "malformed message: {e}"),
            FrameError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the message"),
            FrameError::Limit(what) => write!(f, "message exceeds a protocol limit: {what}"),
            FrameError::Truncated => write!(f, "frame is shorter than its length prefix"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses a length prefix at the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((prefix_len, body_len)))` otherwise.
/// Refuses lengths above [`MAX_FRAME_LEN`] as soon as enough prefix bytes have arrived to know.
pub fn frame_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().enumerate() {
        if i == MAX_PREFIX_LEN {
            return Err(FrameError::BadPrefix);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if value > MAX_FRAME_LEN as u64 {
            return Err(FrameError::TooLong(value));
        }
        if byte & 0x80 == 0 {
            // A final zero byte after the first makes the encoding non-minimal.
            if i > 0 && byte == 0 {
                return Err(FrameError::BadPrefix);
            }
            return Ok(Some((i + 1, value as usize)));
        }
    }
    if buf.len() >= MAX_PREFIX_LEN {
        return Err(FrameError::BadPrefix);
    }
    Ok(None)
}

/// Decodes one message body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Message, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(body.len() as u64));
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    msg.validate()?;
    Ok(msg)
}

/// Decodes one whole frame (prefix and body) that must fill `buf` exactly.
pub fn decode_frame(buf: &[u8]) -> Result<Message, FrameError> {
    let (prefix, len) = frame_header(buf)?.ok_or(FrameError::Truncated)?;
    let body = &buf[prefix..];
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    if body.len() > len {
        return Err(FrameError::TrailingBytes(body.len() - len));
    }
    decode(body)
}

/// Appends the frame for `msg` (prefix and body) to `out`.
///
/// Fails without touching `out`'s existing contents if the message breaks a limit or the body
/// would exceed [`MAX_FRAME_LEN`].
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    msg.validate()?;
    let start = out.len();
    // Reserve the longest prefix, encode the body after it, then shift if the prefix is shorter.
    out.extend_from_slice(&[0u8; MAX_PREFIX_LEN]);
    let body_start = out.len();
    if let Err(e) = postcard::to_extend(msg, Sink(out)) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let body_len = out.len() - body_start;
    if body_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLong(body_len as u64));
    }
    let mut prefix = [0u8; MAX_PREFIX_LEN];
    let n = write_varint(body_len, &mut prefix);
    let gap = MAX_PREFIX_LEN - n;
    out[start + gap..start + MAX_PREFIX_LEN].copy_from_slice(&prefix[..n]);
    if gap > 0 {
        out.drain(start..start + gap);
    }
    Ok(())
}

/// Encodes `msg` as one frame (prefix and body).
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Lets postcard append to a borrowed buffer, so a failed encode can be undone by truncation.
struct Sink<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Sink<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

fn write_varint(mut value: usize, out: &mut [u8; MAX_PREFIX_LEN]) -> usize {
    let mut i = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[test]
    fn prefix_boundaries() {
        assert_eq!(frame_header(&[]).unwrap(), None);
        assert_eq!(frame_header(&[0x05]).unwrap(), Some((1, 5)));
        assert_eq!(frame_header(&[0x80]).unwrap(), None);
        assert_eq!(frame_header(&[0x80, 0x01]).unwrap(), Some((2, 128)));
        assert_eq!(frame_header(&[0x80, 0x00]), Err(FrameError::BadPrefix));
        // MAX_FRAME_LEN itself is allowed, one more is not.
        let mut p = [0u8; MAX_PREFIX_LEN];
        let n = write_varint(MAX_FRAME_LEN, &mut p);
        assert_eq!(frame_header(&p[..n]).unwrap(), Some((n, MAX_FRAME_LEN)));
        let n = write_varint(MAX_FRAME_LEN + 1, &mut p);
        assert!(matches!(frame_header(&p[..n]), Err(FrameError::TooLong(_))));
        assert_eq!(
            frame_header(&[0xff, 0xff, 0xff, 0x01]),
            Err(FrameError::TooLong(0x3f_ffff))
        );
        assert_eq!(
            frame_header(&[0x80, 0x80, 0x80, 0x80, 0x00]),
            Err(FrameError::BadPrefix)
        );
    }

    #[test]
    fn roundtrip_and_prefix_shift() {
        for size in [0usize, 1, 100, 127, 128, 16_383, 16_384, 70_000] {
            let msg = Message::Data(Data {
                channel: 1,
                id: 2,
                index: 3,
                blocks: vec![Block(vec![7u8; size])],
                nodes: vec![],
                upgrade: None,
            });
            let frame = encode(&msg).unwrap();
            assert_eq!(decode_frame(&frame).unwrap(), msg);
        }
    }

    #[test]
    fn oversized_message_refused_on_encode() {
        let msg = Message::Data(Data {
            channel: 0,
            id: 0,
            index: 0,
            blocks: vec![Block(vec![0; MAX_DATA_BYTES + 1])],
            nodes: vec![],
            upgrade: None,
        });
        let mut out = vec![9u8];
        assert!(matches!(
            encode_into(&msg, &mut out),
            Err(FrameError::Limit(_))
        ));
        assert_eq!(out, vec![9u8]);
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut body = postcard::to_allocvec(&Message::Ping(Ping { nonce: 1 })).unwrap();
        body.push(0);
        assert_eq!(decode(&body), Err(FrameError::TrailingBytes(1)));
    }
}
