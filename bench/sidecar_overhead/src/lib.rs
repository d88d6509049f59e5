//! What the mock worker and the load generator share: the SSE chunk format and its wall-clock stamp.
//!
//! Each streamed chunk carries the Unix time in nanoseconds at which the mock produced it (`"t"`), so
//! the client can time each chunk's trip (mock → client, directly or through the sidecar). Both
//! processes run on one machine, so they read the same clock.

use std::time::{SystemTime, UNIX_EPOCH};

pub mod client;

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Nanoseconds since the Unix epoch (the one clock two processes on a machine share).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Chunk `index` of a chat completion stream, stamped with `t` (see [`unix_ns`]).
pub fn chunk(index: usize, t: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"mock\",\"t\":{t},\"i\":{index},\"choices\":[{{\"index\":0,\
         \"delta\":{{\"content\":\"tok\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

/// The stamp of one event written by [`chunk`], found without parsing the whole JSON.
pub fn stamp(event: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\":";
    let at = event.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value = 0u64;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let c = chunk(7, 1_234_567_890_123);
        assert!(c.starts_with("data: {") && c.ends_with("}\n\n"));
        assert_eq!(stamp(c.as_bytes()), Some(1_234_567_890_123));
        let parsed: serde_json::Value = serde_json::from_str(&c[6..c.len() - 2]).unwrap();
        assert_eq!(parsed["i"], 7);
        assert_eq!(stamp(DONE), None);
    }
}
