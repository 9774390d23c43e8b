//! The `message` frame. Built here as a string so that live broadcasts (serialized once, by the
//! store) and history replies carry byte-identical JSON. The Redis Lua script in room-service
//! builds the same shape; a test there compares the two.

/// Appends `s` to `out` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping is correct for every input; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// `{"type":"message","room":…,"offset":…,"epoch":…,"user":…,"clientId":…,"data":…}`.
/// `data_json` must already be valid JSON (the gateway validated it).
pub fn message_frame(
    room: &str,
    offset: u64,
    epoch: &str,
    user: &str,
    client_id: &str,
    data_json: &str,
) -> String {
    let mut out = String::with_capacity(96 + room.len() + user.len() + data_json.len());
    out.push_str("{\"type\":\"message\",\"room\":");
    push_json_string(&mut out, room);
    out.push_str(",\"offset\":");
    out.push_str(&offset.to_string());
    out.push_str(",\"epoch\":");
    push_json_string(&mut out, epoch);
    out.push_str(&message_frame_tail(user, client_id, data_json));
    out
}

/// The part of a message frame after the epoch: `,"user":…,"clientId":…,"data":…}`. The Redis
/// store sends this to its Lua script, which prepends room, offset and epoch.
pub fn message_frame_tail(user: &str, client_id: &str, data_json: &str) -> String {
    let mut out = String::with_capacity(40 + user.len() + client_id.len() + data_json.len());
    out.push_str(",\"user\":");
    push_json_string(&mut out, user);
    out.push_str(",\"clientId\":");
    push_json_string(&mut out, client_id);
    out.push_str(",\"data\":");
    out.push_str(data_json);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_valid_json_with_all_fields() {
        let frame = message_frame("r:1", 7, "e1", "al\"ice", "c1", r#"{"x":[1,2]}"#);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "r:1");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["clientId"], "c1");
        assert_eq!(v["data"]["x"][1], 2);
    }
}
