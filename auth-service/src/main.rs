//! `auth-service`: serves `AuthService` over gRPC (default), or mints a development token
//! (`mint-token`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use roomcast_auth::{Verifier, VerifierConfig, mint_hs256};
use roomcast_common::ops::{self, Readiness};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

// jemalloc, as in the gateway: a gRPC call allocates and frees many small buffers, which
// glibc's malloc serves more slowly.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "auth-service",
    version,
    about = "Roomcast auth service",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print an HS256 token for development on stdout.
    MintToken(MintArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(
        long = "addr",
        env = "AUTH_SERVICE_ADDR",
        default_value = "0.0.0.0:50052"
    )]
    addr: SocketAddr,
    /// Listen address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9102")]
    metrics_addr: SocketAddr,
    /// Shared HS256 secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM public key: RSA (RS256) or EC P-256 (ES256).
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<PathBuf>,
    /// JSON Web Key Set URL (http:// or https://); the token's `kid` picks the key (RS256 or
    /// ES256).
    #[arg(long, env = "JWKS_URL")]
    jwks_url: Option<String>,
    /// How often the JWKS is fetched again, in seconds.
    #[arg(long, env = "JWKS_REFRESH_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    jwks_refresh_seconds: u64,
    /// The least time, in seconds, between a JWKS fetch and one caused by a token with an
    /// unknown `kid`.
    #[arg(long, env = "JWKS_MIN_REFRESH_SECONDS", default_value_t = 10)]
    jwks_min_refresh_seconds: u64,
    /// Required `aud`; when unset, tokens carrying an `aud` are refused.
    #[arg(long, env = "JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Required `iss`.
    #[arg(long, env = "JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Credential of internal calls (gateways); required.
    #[arg(long, env = "INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
    /// PEM certificate chain of the gRPC server; with GRPC_TLS_KEY_FILE, gRPC is served over
    /// TLS only.
    #[arg(long, env = "GRPC_TLS_CERT_FILE")]
    grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of GRPC_TLS_CERT_FILE.
    #[arg(long, env = "GRPC_TLS_KEY_FILE")]
    grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate issued by it (mTLS).
    #[arg(long, env = "GRPC_TLS_CLIENT_CA_FILE")]
    grpc_tls_client_ca_file: Option<PathBuf>,
}

#[derive(Args)]
struct MintArgs {
    /// User id.
    #[arg(long)]
    sub: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Comma-separated room patterns the user may join (default: every room).
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    /// Comma-separated room patterns the user may publish to (default: same as --rooms).
    #[arg(long, value_delimiter = ',')]
    publish: Option<Vec<String>>,
    /// HS256 secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
}

fn main() -> anyhow::Result<()> {
    roomcast_common::runtime::build()?.block_on(auth_main())
}

async fn auth_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MintToken(args)) => mint(args),
        None => {
            let result = run(cli.serve).await;
            if let Err(e) = &result {
                // One line in the log as well, where operators look first.
                tracing::error!("{e:#}");
            }
            // Sends the spans still queued (nothing to do without OTEL_EXPORTER_OTLP_ENDPOINT).
            let _ = tokio::task::spawn_blocking(roomcast_common::telemetry::shutdown).await;
            result
        }
    }
}

fn mint(args: MintArgs) -> anyhow::Result<()> {
    // `--rooms ''` means "no rooms"; stray spaces around commas are not part of a pattern.
    let clean = |list: Option<Vec<String>>| {
        list.map(|l| {
            l.iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
        })
    };
    let token = mint_hs256(
        args.secret.as_bytes(),
        &args.sub,
        args.ttl,
        clean(args.rooms),
        clean(args.publish),
    )?;
    println!("{token}");
    Ok(())
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    roomcast_common::telemetry::init_with_service("auth-service");
    let internal_token = roomcast_common::credential::validate(
        "INTERNAL_TOKEN",
        args.internal_token.as_deref(),
        "gateways authenticate internal calls with it; give every process the same value",
    )?;
    let grpc_tls = roomcast_common::tls::grpc_server(
        args.grpc_tls_cert_file.as_deref(),
        args.grpc_tls_key_file.as_deref(),
        args.grpc_tls_client_ca_file.as_deref(),
    )?;
    let tls = match (&grpc_tls, &args.grpc_tls_client_ca_file) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    let verifier = Verifier::from_config(&VerifierConfig {
        jwt_secret: args.jwt_secret,
        jwt_public_key_file: args.jwt_public_key_file,
        jwks_url: args.jwks_url,
        jwks_refresh: Some(Duration::from_secs(args.jwks_refresh_seconds)),
        jwks_min_refresh: Some(Duration::from_secs(args.jwks_min_refresh_seconds)),
        audience: args.jwt_audience,
        issuer: args.jwt_issuer,
    })
    .await?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    // One stop flag shared by both servers; readiness drops first so load balancers drain us.
    let readiness = Readiness::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down");
            readiness.set(false);
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let metrics = tokio::spawn(ops::serve(
        metrics_listener,
        readiness.clone(),
        stopped(stop_rx.clone()),
    ));
    readiness.set(true);
    let keys = match (verifier.algorithm(), verifier.jwks()) {
        (_, Some(jwks)) => format!("JWKS {}", jwks.url()),
        (Some(algorithm), None) => format!("{algorithm:?}"),
        (None, None) => "none".to_owned(),
    };
    tracing::info!(addr = %addr, metrics_addr = %metrics_addr, keys, tls, "listening");

    roomcast_auth::serve_tls(
        listener,
        verifier,
        internal_token,
        grpc_tls,
        stopped(stop_rx),
    )
    .await?;
    metrics.await.context("metrics server task failed")??;
    tracing::info!("stopped");
    Ok(())
}
