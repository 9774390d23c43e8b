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
            raw_handshakes => ClusterOptions::default(),
            forbidden_and_not_joined => ClusterOptions::default(),
            ordering_under_concurrent_publishers => ClusterOptions::default(),
            late_join_during_traffic => ClusterOptions::default(),
            bad_requests_keep_connection => ClusterOptions::default(),
            oversized_frame_closes_1009 => ClusterOptions::default().max_frame_bytes(4096),
            heartbeat_drops_silent_client => ClusterOptions::default().heartbeat(200, 600),
            pings_ride_along_with_deliveries => ClusterOptions::default().heartbeat(200, 600),
            presence_and_member_events => ClusterOptions::default(),
            history_oldest_first => ClusterOptions::default(),
            history_window_bounds => ClusterOptions::default().history(3, 2),
            recovery_with_since => ClusterOptions::default(),
            ops_endpoints => ClusterOptions::default(),
            refresh_token => ClusterOptions::default(),
            server_api => ClusterOptions::default(),
            server_api_batches => ClusterOptions::default(),
            server_api_disconnect => ClusterOptions::default(),
            server_api_subscribe => ClusterOptions::default(),
            idempotent_client_publish => ClusterOptions::default(),
            token_expiry_closes_4001 => ClusterOptions::default(),
            publish_rate_limit => ClusterOptions::default()
                .gateway_env("PUBLISH_RATE", 2)
                .gateway_env("PUBLISH_BURST", 5)
                .gateway_env("RATE_LIMIT_CLOSE_AFTER", 3),
            connection_limits => ClusterOptions::default()
                .gateway_env("MAX_ROOMS_PER_CONNECTION", 3)
                .gateway_env("MAX_CONNECTIONS_PER_USER", 2),
            handshake_burst => ClusterOptions::default()
                .gateway_env("MAX_CONNECTIONS_PER_USER", 2),
            write_delay_batches_broadcasts => ClusterOptions::default().gateway_env(
                "WRITE_DELAY_MS",
                roomcast_integration::scenarios::WRITE_DELAY.as_millis(),
            ),
            namespaces => ClusterOptions::default()
                .namespaces(roomcast_integration::scenarios::NAMESPACES),
            slow_consumer_closes_4008 => ClusterOptions::default()
                .gateway_env("OUTBOUND_QUEUE_LEN", 8)
                .gateway_env("PUBLISH_RATE", 100_000)
                .gateway_env("PUBLISH_BURST", 100_000),
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
