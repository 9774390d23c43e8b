//! Property-based fuzzing of everything the gateway decodes from the outside: client frames
//! and broker payloads. Run in CI with a fixed case count (bounded time); the property is that
//! decoding never panics and that what it accepts satisfies the protocol's rules.

use bytes::Bytes;
use proptest::prelude::*;
use roomcast_common::envelope;
use roomcast_common::error_code::ErrorCode;
use roomcast_common::room::validate_room_name;
use roomcast_gateway::protocol::{Command, parse};

/// Cases per property; 20,000 keeps the whole file to a few seconds in a debug build.
const CASES: u32 = 20_000;

/// JSON-ish text: frames built from the protocol's own vocabulary, with random values of any
/// type in any field, so the fuzzer reaches the per-type validation instead of stopping at
/// "not JSON".
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[a-zA-Z0-9_.:* \\-]{0,140}".prop_map(|s| format!("{s:?}")),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z]{1,8}", inner), 0..4).prop_map(|v| {
                let fields: Vec<String> =
                    v.into_iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

fn frame() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("\"ping\"".to_owned()),
        Just("\"join\"".to_owned()),
        Just("\"leave\"".to_owned()),
        Just("\"publish\"".to_owned()),
        Just("\"presence\"".to_owned()),
        Just("\"history\"".to_owned()),
        Just("\"refresh\"".to_owned()),
        json_value(),
    ];
    let field = prop_oneof![
        Just("id"),
        Just("room"),
        Just("data"),
        Just("since"),
        Just("limit"),
        Just("token"),
        Just("epoch"),
        Just("offset"),
    ];
    (kind, prop::collection::vec((field, json_value()), 0..6)).prop_map(|(kind, fields)| {
        let mut parts = vec![format!("\"type\":{kind}")];
        parts.extend(fields.into_iter().map(|(k, v)| format!("\"{k}\":{v}")));
        format!("{{{}}}", parts.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        if let Err(error) = parse(&text) {
            prop_assert_eq!(error.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn structured_frames_are_accepted_only_when_valid(text in frame()) {
        match parse(&text) {
            Ok(request) => match request.command {
                Command::Join { room, .. }
                | Command::Leave { room }
                | Command::Presence { room }
                | Command::Publish { room, .. } => {
                    prop_assert!(validate_room_name(&room).is_ok(), "accepted bad room {room:?}");
                }
                Command::History { room, limit, .. } => {
                    prop_assert!(validate_room_name(&room).is_ok());
                    prop_assert!((1..=1000).contains(&limit));
                }
                Command::Refresh { token } => prop_assert!(!token.is_empty()),
                Command::Ping => {}
            },
            Err(error) => {
                prop_assert_eq!(error.code, ErrorCode::BadRequest);
                prop_assert!(!error.message.is_empty());
            }
        }
    }

    #[test]
    fn broker_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), kind in prop::sample::select(vec![b'M', b'E', b'C', b'X'])) {
        let mut payload = vec![kind];
        payload.extend(bytes);
        let _ = envelope::decode(Bytes::from(payload));
    }
}
