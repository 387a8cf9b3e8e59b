//! `wgmesh-control`: the wgmesh coordination server and its admin CLI.
//!
//! ```text
//! wgmesh-control serve --listen 0.0.0.0:8080 --db sqlite:/var/lib/wgmesh-control/control.db --policy /etc/wgmesh/policy.toml
//! wgmesh-control key show                      # the public key nodes pin
//! wgmesh-control authkey create --reusable --expiry 24h --tag tag:server
//! wgmesh-control nodes list
//! wgmesh-control routes approve NODE 10.1.0.0/16
//! wgmesh-control node expire NODE | node delete NODE
//! wgmesh-control policy show | policy reload
//! ```
//!
//! The admin commands talk to the running server over its unix socket
//! (`--admin-socket`, root or the server's user only).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ipnet::IpNet;
use wgmesh_control::ControlConfig;
use wgmesh_control_server::admin::{self, AdminRequest};
use wgmesh_control_server::{Limits, ServeConfig, key};

const DEFAULT_ADMIN_SOCKET: &str = "/run/wgmesh-control/admin.sock";
const DEFAULT_KEY_FILE: &str = "/var/lib/wgmesh-control/server.key";

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-control",
    version,
    about = "The wgmesh coordination server and its admin CLI"
)]
struct Cli {
    /// The running server's admin socket.
    #[arg(long, global = true, env = "WGMESH_CONTROL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Runs the server.
    Serve(Box<ServeArgs>),
    /// The server key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Pre-auth keys.
    Authkey {
        #[command(subcommand)]
        command: AuthkeyCommand,
    },
    /// The nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Subnet routes.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
    },
    /// One node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The ACL policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The HTTP address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// `sqlite:PATH` (default store) or `postgres://USER@HOST/DB` (replicas).
    #[arg(long, default_value = "sqlite:/var/lib/wgmesh-control/control.db")]
    db: String,
    /// The ACL policy file; without it every node reaches every node.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The server key file (made with mode 0600 on first start).
    #[arg(long, default_value = DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// The tailnet's DNS name (node `host` is `host.NAME`).
    #[arg(long, default_value = "wgmesh.internal")]
    tailnet_name: String,
    /// How long a node key stays valid after registration (`0s`: forever).
    #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
    node_key_expiry: Duration,
    /// This replica's name in change notices (random by default).
    #[arg(long)]
    replica_id: Option<String>,
    /// The most map streams open at once.
    #[arg(long, default_value_t = Limits::default().max_streams)]
    max_streams: usize,
    /// Map messages queued per stream before a slow node's stream is dropped.
    #[arg(long, default_value_t = Limits::default().stream_buffer_messages)]
    stream_buffer_messages: usize,
    /// Seconds between keepalive frames on an idle stream.
    #[arg(long, default_value_t = Limits::default().keepalive_interval.as_secs())]
    keepalive_secs: u64,
    /// A STUN server every node is told to use (`IP:PORT`), repeatable.
    #[arg(long = "stun-server")]
    stun_servers: Vec<SocketAddr>,
    /// The TURN relay (`IP:PORT`, UDP) nodes fall back to; needs
    /// `--turn-secret-file`.
    #[arg(long, requires = "turn_secret_file")]
    turn_server: Option<SocketAddr>,
    /// The file holding the secret shared with the TURN server (coturn's
    /// `static-auth-secret`); only this server reads it, nodes get
    /// time-limited credentials made from it.
    #[arg(long, requires = "turn_server")]
    turn_secret_file: Option<PathBuf>,
    /// How long each node's TURN credentials are valid; fresh ones are
    /// pushed when half of it has passed.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    turn_credential_ttl: Duration,
}

/// The NAT settings of `args`, the secret read from its file.
fn nat_settings(args: &ServeArgs) -> Result<wgmesh_control::NatIssuer, String> {
    let relay = match (&args.turn_server, &args.turn_secret_file) {
        (Some(server), Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--turn-secret-file {}: {e}", path.display()))?;
            Some(wgmesh_control::RelayIssuer {
                server: *server,
                shared_secret: zeroize::Zeroizing::new(text.trim().to_owned()),
                credential_ttl: args.turn_credential_ttl,
            })
        }
        (None, None) => None,
        // clap's `requires` refuses one without the other.
        (Some(_), None) | (None, Some(_)) => {
            return Err("--turn-server and --turn-secret-file go together".into());
        }
    };
    let nat = wgmesh_control::NatIssuer {
        stun_servers: args.stun_servers.clone(),
        relay,
    };
    nat.check().map_err(|e| format!("NAT settings: {e}"))?;
    Ok(nat)
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Prints the server's public key (making the key file if there is none).
    Show {
        /// The server key file.
        #[arg(long, default_value = DEFAULT_KEY_FILE)]
        key_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuthkeyCommand {
    /// Makes a pre-auth key and prints it (shown once).
    Create {
        /// It may register more than one node.
        #[arg(long)]
        reusable: bool,
        /// It stops working after this long (`24h`, `7d`); default: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expiry: Option<Duration>,
        /// A tag for the nodes it registers (`tag:NAME`), repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The user its nodes belong to.
        #[arg(long, default_value = "admin@wgmesh.internal")]
        user: String,
    },
    /// Lists the auth keys (never their secrets).
    List,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Lists the nodes as JSON.
    List,
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// Approves a route a node advertises.
    Approve {
        /// The node: key, host name or MagicDNS name.
        node: String,
        /// The route.
        prefix: IpNet,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Expires a node's key now (it must register again).
    Expire {
        /// The node: key, host name or MagicDNS name.
        node: String,
    },
    /// Deletes a node (its address is freed).
    Delete {
        /// The node: key, host name or MagicDNS name.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Prints the policy in force.
    Show,
    /// Reads the policy file again; a bad file is refused with
    /// file:line:column and the running policy kept.
    Reload,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("wgmesh-control: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wgmesh-control: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let request = match cli.command {
        Top::Serve(args) => return serve(*args, cli.admin_socket).await,
        Top::Key {
            command: KeyCommand::Show { key_file },
        } => {
            let key = key::load_or_create(&key_file).map_err(|e| e.to_string())?;
            println!("{}", key.server_key());
            return Ok(());
        }
        Top::Authkey {
            command:
                AuthkeyCommand::Create {
                    reusable,
                    expiry,
                    tags,
                    user,
                },
        } => AdminRequest::CreateAuthKey {
            user,
            reusable,
            expiry_secs: expiry.map(|d| d.as_secs().max(1)),
            tags,
        },
        Top::Authkey {
            command: AuthkeyCommand::List,
        } => AdminRequest::ListAuthKeys,
        Top::Nodes {
            command: NodesCommand::List,
        } => AdminRequest::ListNodes,
        Top::Routes {
            command: RoutesCommand::Approve { node, prefix },
        } => AdminRequest::ApproveRoute {
            node,
            route: prefix,
        },
        Top::Node {
            command: NodeCommand::Expire { node },
        } => AdminRequest::ExpireNode { node },
        Top::Node {
            command: NodeCommand::Delete { node },
        } => AdminRequest::DeleteNode { node },
        Top::Policy {
            command: PolicyCommand::Show,
        } => AdminRequest::PolicyShow,
        Top::Policy {
            command: PolicyCommand::Reload,
        } => AdminRequest::PolicyReload,
    };
    let is_create = matches!(request, AdminRequest::CreateAuthKey { .. });
    let is_policy_show = matches!(request, AdminRequest::PolicyShow);
    let result = admin::call(&cli.admin_socket, &request)
        .await
        .map_err(|e| e.to_string())?;
    if is_create {
        // The key alone on stdout, so scripts can take it with $(...).
        match result.get("key").and_then(|k| k.as_str()) {
            Some(key) => println!("{key}"),
            None => return Err(format!("server answered without a key: {result}")),
        }
    } else if is_policy_show {
        match result.get("text").and_then(|t| t.as_str()) {
            Some("") | None => println!("# no policy file: every node reaches every node"),
            Some(text) => print!("{text}"),
        }
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs, admin_socket: PathBuf) -> Result<(), String> {
    let nat = nat_settings(&args)?;
    let mut control = ControlConfig::new(args.tailnet_name);
    control.node_key_expiry = (!args.node_key_expiry.is_zero()).then_some(args.node_key_expiry);
    control.nat = nat;
    let config = ServeConfig {
        listen: args.listen,
        db: args.db,
        policy_path: args.policy,
        key_file: args.key_file,
        admin_socket: Some(admin_socket),
        control,
        replica_id: args.replica_id,
        limits: Limits {
            max_streams: args.max_streams,
            stream_buffer_messages: args.stream_buffer_messages,
            keepalive_interval: Duration::from_secs(args.keepalive_secs.max(1)),
            ..Limits::default()
        },
    };
    let server = wgmesh_control_server::start(config)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "listening on {} server key {}",
        server.addr, server.server_key
    );
    server
        .run_until(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await;
    Ok(())
}
