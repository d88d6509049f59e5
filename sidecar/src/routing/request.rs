//! What routing needs from a request: the model, a session key, and the prompt's text prefix.
//!
//! Works across the APIs we proxy (OpenAI chat/completions/responses, Anthropic messages, Ollama)
//! by reading the fields they share; unknown bodies route by load alone.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

/// Prompt text beyond this many bytes does not change routing (and bounds the prefix tree).
pub const MAX_PREFIX_BYTES: usize = 16 * 1024;

/// How a request identifies its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKey {
    /// Hash of the key (never the key itself: it may be a user id).
    pub hash: u64,
    /// Sent by the client (`X-Session-Id`, `session_id`, `user`, `metadata.user_id`) rather than derived.
    pub explicit: bool,
}

/// The routing view of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteInfo {
    /// Requested model, if the body names one.
    pub model: Option<String>,
    /// Conversation key, explicit or derived from the conversation's first turn.
    pub session: Option<SessionKey>,
    /// The prompt's text as role-tagged messages, at most [`MAX_PREFIX_BYTES`].
    pub prefix: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Body {
    model: Option<String>,
    /// Ollama's deprecated spelling of `model`.
    name: Option<String>,
    session_id: Option<Value>,
    user: Option<Value>,
    metadata: Option<Metadata>,
    system: Option<Value>,
    instructions: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    messages: Option<Vec<Value>>,
    input: Option<Value>,
    prompt: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    user_id: Option<Value>,
}

impl RouteInfo {
    /// Read routing information from headers and a (possibly non-JSON) body.
    pub fn from_request(headers: &HeaderMap, body: &[u8]) -> RouteInfo {
        let parsed: Body = if body.first() == Some(&b'{') {
            serde_json::from_slice(body).unwrap_or_default()
        } else {
            Body::default()
        };
        let model = parsed.model.clone().or_else(|| parsed.name.clone());
        let mut prefix = Prefix::default();
        // Templates render the tools before the conversation, so requests with other tools share no
        // KV prefix. A hash stands in for them: tool lists run to tens of KB, past the prefix cap.
        if let Some(tools) = shown_tools(&parsed) {
            let mut h = DefaultHasher::new();
            hash_canonical(tools, &mut h);
            prefix.push("tools", &Value::String(format!("{:016x}", h.finish())));
        }
        for part in [&parsed.system, &parsed.instructions].into_iter().flatten() {
            prefix.push("system", part);
        }
        // The conversation's stable part: everything up to and including the first user turn.
        let mut first_turn_end = None;
        for m in parsed.messages.iter().flatten() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            prefix.push(role, m.get("content").unwrap_or(&Value::Null));
            if role == "user" && first_turn_end.is_none() {
                first_turn_end = Some(prefix.text.len());
            }
        }
        match &parsed.input {
            Some(Value::Array(items)) => {
                for item in items {
                    let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                    prefix.push(role, item.get("content").unwrap_or(item));
                    if role == "user" && first_turn_end.is_none() {
                        first_turn_end = Some(prefix.text.len());
                    }
                }
            }
            Some(v) => {
                prefix.push("user", v);
                first_turn_end.get_or_insert(prefix.text.len());
            }
            None => {}
        }
        if let Some(p) = &parsed.prompt {
            let first = match p {
                Value::Array(items) => items.first().unwrap_or(&Value::Null),
                v => v,
            };
            prefix.push("prompt", first);
        }

        let explicit = header_str(headers, "x-session-id")
            .map(str::to_owned)
            .or_else(|| key_text(parsed.session_id.as_ref()))
            .or_else(|| key_text(parsed.user.as_ref()))
            .or_else(|| key_text(parsed.metadata.as_ref().and_then(|m| m.user_id.as_ref())));
        let session = match (explicit, first_turn_end) {
            (Some(key), _) => Some(SessionKey {
                hash: hash(&(model.as_deref(), key.as_str())),
                explicit: true,
            }),
            (None, Some(end)) => Some(SessionKey {
                hash: hash(&(model.as_deref(), &prefix.text[..end])),
                explicit: false,
            }),
            (None, None) => None,
        };
        RouteInfo {
            model,
            session,
            prefix: prefix.text,
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

fn key_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The tools the model is shown: none for an empty list or a `none` tool choice (the worker then
/// leaves them out of the prompt).
fn shown_tools(body: &Body) -> Option<&Value> {
    let tools = body
        .tools
        .as_ref()
        .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()))?;
    let choice = body.tool_choice.as_ref();
    let none = choice.and_then(|c| c.as_str().or_else(|| c.get("type")?.as_str())) == Some("none");
    (!none).then_some(tools)
}

/// Hash a JSON value with object keys in sorted order, so key order does not change it.
fn hash_canonical(value: &Value, h: &mut DefaultHasher) {
    match value {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            h.write_u8(b'{');
            for k in keys {
                k.hash(h);
                hash_canonical(&o[k], h);
            }
            h.write_u8(b'}');
        }
        Value::Array(items) => {
            h.write_u8(b'[');
            items.iter().for_each(|v| hash_canonical(v, h));
            h.write_u8(b']');
        }
        other => other.to_string().hash(h),
    }
}

fn hash(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Role-tagged prompt text, capped at [`MAX_PREFIX_BYTES`].
#[derive(Default)]
struct Prefix {
    text: String,
}

impl Prefix {
    fn push(&mut self, role: &str, content: &Value) {
        if self.text.len() >= MAX_PREFIX_BYTES {
            return;
        }
        self.text.push_str(role);
        self.text.push('\n');
        push_content(&mut self.text, content);
        self.text.push('\n');
        if self.text.len() > MAX_PREFIX_BYTES {
            let mut end = MAX_PREFIX_BYTES;
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            self.text.truncate(end);
        }
    }
}

/// Text of a message's content: a string, or the text parts of an array of blocks.
fn push_content(out: &mut String, content: &Value) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        if let Some(Value::String(s)) = o.get("text").or_else(|| o.get("content")) {
                            out.push_str(s);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(body: Value) -> RouteInfo {
        RouteInfo::from_request(&HeaderMap::new(), body.to_string().as_bytes())
    }

    #[test]
    fn chat_turns_share_a_derived_session() {
        let turn1 = info(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"}]}));
        let turn2 = info(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "more"}]}]}));
        let other = info(json!({"model": "m", "messages": [{"role": "user", "content": "bye"}]}));
        let s1 = turn1.session.unwrap();
        assert!(!s1.explicit);
        assert_eq!(Some(s1), turn2.session);
        assert_ne!(Some(s1), other.session);
        assert!(turn2.prefix.starts_with(&turn1.prefix));
        assert!(turn2.prefix.ends_with("user\nmore\n"));
    }

    #[test]
    fn explicit_keys_in_priority_order() {
        let mut headers = HeaderMap::new();
        headers.insert("x-session-id", "abc".parse().unwrap());
        let body =
            json!({"model": "m", "user": "u1", "messages": [{"role": "user", "content": "x"}]});
        let with_header = RouteInfo::from_request(&headers, body.to_string().as_bytes());
        let with_user = info(body);
        let with_session_id = info(json!({"model": "m", "session_id": "abc"}));
        let anthropic = info(json!({"model": "m", "metadata": {"user_id": "u1"}}));
        assert!(with_header.session.unwrap().explicit);
        assert_eq!(with_header.session, with_session_id.session);
        assert_eq!(with_user.session, anthropic.session);
        assert_ne!(with_user.session, with_header.session);
    }

    #[test]
    fn same_key_for_another_model_is_another_session() {
        let a = info(json!({"model": "a", "user": "u"}));
        let b = info(json!({"model": "b", "user": "u"}));
        assert_ne!(a.session, b.session);
    }

    #[test]
    fn reads_every_api_shape() {
        let anthropic = info(
            json!({"model": "m", "system": [{"type": "text", "text": "sys"}],
            "messages": [{"role": "user", "content": "q"}]}),
        );
        assert_eq!(anthropic.prefix, "system\nsys\nuser\nq\n");
        let responses = info(json!({"model": "m", "instructions": "i", "input": "q"}));
        assert_eq!(responses.prefix, "system\ni\nuser\nq\n");
        assert!(responses.session.is_some());
        let completion = info(json!({"model": "m", "prompt": ["once upon"]}));
        assert_eq!(
            (completion.prefix.as_str(), completion.session),
            ("prompt\nonce upon\n", None)
        );
        let ollama = info(json!({"name": "llama", "prompt": "p"}));
        assert_eq!(ollama.model.as_deref(), Some("llama"));
    }

    #[test]
    fn tools_lead_the_prefix_in_any_key_order() {
        let msgs = json!([{"role": "user", "content": "q"}]);
        let weather = json!([{"type": "function", "function": {"name": "w", "parameters": {}}}]);
        let reordered = json!([{"function": {"parameters": {}, "name": "w"}, "type": "function"}]);
        let add = json!([{"type": "function", "function": {"name": "add"}}]);
        let with = |tools: &Value, extra: Value| {
            let mut body = json!({"model": "m", "messages": msgs, "tools": tools});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            info(body)
        };
        let plain = info(json!({"model": "m", "messages": msgs}));
        let a = with(&weather, json!({}));
        assert!(a.prefix.starts_with("tools\n") && a.prefix.ends_with(&plain.prefix));
        assert_eq!(a, with(&reordered, json!({})));
        let b = with(&add, json!({}));
        assert_ne!(a.prefix, b.prefix);
        assert_ne!(a.session, b.session);
        // Tools the model is not shown do not count.
        assert_eq!(with(&json!([]), json!({})), plain);
        assert_eq!(with(&weather, json!({"tool_choice": "none"})), plain);
        assert_eq!(
            with(&weather, json!({"tool_choice": {"type": "none"}})),
            plain
        );
        let anthropic = info(
            json!({"model": "m", "system": "s", "tools": [{"name": "w", "input_schema": {}}],
            "messages": msgs}),
        );
        assert!(
            anthropic.prefix.starts_with("tools\n") && anthropic.prefix.contains("\nsystem\ns\n")
        );
    }

    #[test]
    fn non_json_bodies_route_by_load() {
        let r = RouteInfo::from_request(&HeaderMap::new(), b"not json");
        assert_eq!(r, RouteInfo::default());
        let r = RouteInfo::from_request(&HeaderMap::new(), b"{\"model\": 3}");
        assert_eq!(r, RouteInfo::default());
    }

    #[test]
    fn prefix_is_capped_on_a_char_boundary() {
        let long = "é".repeat(MAX_PREFIX_BYTES);
        let r = info(json!({"model": "m", "messages": [{"role": "user", "content": long}]}));
        assert!(r.prefix.len() <= MAX_PREFIX_BYTES && r.prefix.len() > MAX_PREFIX_BYTES - 4);
    }
}
