//! The client-visible tests, generated once per flavor by `client_visible_tests!`.
//!
//! Each test starts its own system (fresh processes, fresh redis-server) and kills it at the
//! end, pass or fail. The binaries come from `cargo build --workspace`.

/// One `#[tokio::test]` per scenario of `roomcast_integration::scenarios`, run on `$flavor`.
macro_rules! client_visible_tests {
    ($flavor:expr) => {
        client_visible_tests!(@tests $flavor;
            connected_frame_first => ClusterOptions::default(),
            cross_gateway_delivery => ClusterOptions::default(),
            unauthorized_handshakes => ClusterOptions::default(),
            forbidden_and_not_joined => ClusterOptions::default(),
            ordering_under_concurrent_publishers => ClusterOptions::default(),
            bad_requests_keep_connection => ClusterOptions::default(),
            oversized_frame_closes_1009 => ClusterOptions::default().max_frame_bytes(4096),
            heartbeat_drops_silent_client => ClusterOptions::default().heartbeat(200, 600),
            presence_and_member_events => ClusterOptions::default(),
            history_oldest_first => ClusterOptions::default(),
            recovery_with_since => ClusterOptions::default(),
            ops_endpoints => ClusterOptions::default(),
            refresh_token => ClusterOptions::default(),
        );
    };
    (@tests $flavor:expr; $($name:ident => $opts:expr,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                use roomcast_integration::ClusterOptions;
                roomcast_integration::run(
                    stringify!($name),
                    $flavor,
                    $opts,
                    roomcast_integration::scenarios::$name,
                )
                .await;
            }
        )*
    };
}
