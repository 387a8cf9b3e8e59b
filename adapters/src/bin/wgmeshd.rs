//! `wgmeshd`: the wgmesh node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use wgmesh_adapters::daemon::{self, DaemonOptions};
use wgmesh_adapters::logging::RateLimit;

/// The wgmesh node daemon: a WireGuard mesh node with lazy peers, disco path
/// discovery, TSMP/ICMP/disco pings, routes and DNS.
///
/// It creates the TUN interface, binds the UDP port, applies addresses,
/// routes and DNS from the config file, and serves the local API (for the
/// `wgmesh` CLI) and the WireGuard UAPI socket (for `wg show` / `wg set`).
/// SIGHUP re-reads the config file (a bad file is refused and the running
/// config kept); SIGTERM and SIGINT shut down cleanly, removing every route
/// and address the daemon added and restoring resolv.conf.
///
/// Logging follows RUST_LOG (default "info"). WGMESH_TRIM_WIREGUARD=1 forces
/// lazy peers on, =0 off, whatever the config's keep_full_wg_config says.
/// The data plane is batched (TUN offloads, UDP GSO/GRO, recvmmsg);
/// WGMESH_FASTPATH=0 selects the plain one-packet-per-system-call path.
#[derive(Debug, Parser)]
#[command(name = "wgmeshd", version)]
struct Args {
    /// The TOML config file. Without one, wgmeshd starts with a fresh
    /// private key and no peers, to be configured with `wg set` and `ip`.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// The TUN interface to create or attach to (overrides the file's
    /// interface.name; default "wgmesh0").
    #[arg(short, long, value_name = "NAME")]
    interface: Option<String>,

    /// Stay in the foreground. Without it, wgmeshd starts a detached copy of
    /// itself in a new session and returns at once (like wireguard-go).
    #[arg(short, long)]
    foreground: bool,

    /// Only check the config file and exit: 0 when it is valid, 1 with the
    /// error (file:line:column: field: problem) otherwise.
    #[arg(long, requires = "config")]
    check: bool,

    /// The local API socket (default: <state-dir>/<interface>.sock).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// Where the state file, the API socket and the resolv.conf backup live.
    #[arg(long, value_name = "DIR", default_value = "/run/wgmesh")]
    state_dir: PathBuf,

    /// Where the WireGuard UAPI socket <interface>.sock is created.
    #[arg(long, value_name = "DIR", default_value = "/var/run/wireguard")]
    uapi_dir: PathBuf,

    /// Do not serve the WireGuard UAPI socket.
    #[arg(long)]
    no_uapi: bool,

    /// The resolv.conf file managed in "resolv-conf" DNS mode.
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,

    /// The nice value (-20..19) of the data-plane thread, which moves every
    /// packet between the TUN and the network. The default, -20, lets it
    /// run ahead of the applications whose traffic it carries, so packets
    /// do not queue in the tunnel when the CPU is busy; 0 leaves it at the
    /// normal priority.
    #[arg(
        long,
        value_name = "N",
        env = "WGMESH_DATA_PLANE_NICE",
        default_value_t = daemon::DEFAULT_DATA_PLANE_NICE,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(-20..=19)
    )]
    data_plane_nice: i32,

    /// Join a tailnet through this coordination server (repeat it for each
    /// replica; they are tried in turn). The node key is generated once and
    /// kept in --control-state-dir; peers, addresses, routes, DNS names and
    /// the packet filter come from the server. Needs --control-key; static
    /// peers in a config file and --control are refused together.
    #[arg(long = "control", value_name = "URL")]
    control_urls: Vec<String>,

    /// The pre-auth key to register with (`wgmesh-control authkey create`);
    /// needed only until the node is registered.
    #[arg(
        long,
        value_name = "KEY",
        env = "WGMESH_AUTHKEY",
        hide_env_values = true
    )]
    authkey: Option<String>,

    /// The control server's public key (base64), pinned: answers not sealed
    /// by it are refused.
    #[arg(long, value_name = "KEY")]
    control_key: Option<String>,

    /// Where the node key for control is kept (default /var/lib/wgmesh).
    #[arg(long, value_name = "DIR")]
    control_state_dir: Option<PathBuf>,

    /// The host name to register with control (default: the system's).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Lines other users can cause (an unanswered SYN, a refused caller) must
    // not flood the log: each place in the code gets a budget per window.
    let rate_limit = RateLimit::default();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The STUN and TURN crates log every transaction at INFO from their
    // own spans: warnings only, unless RUST_LOG names them.
    let named = std::env::var("RUST_LOG").unwrap_or_default();
    for noisy in [
        "turn_client_proto",
        "turn_types",
        "stun_proto",
        "stun_types",
    ] {
        if !named.contains(noisy) {
            if let Ok(directive) = format!("{noisy}=warn").parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a terminal: journald and log files
                // get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(rate_limit.clone()),
        )
        .init();
    if let Err(e) = rate_limit.spawn_reporter() {
        eprintln!("wgmeshd: no reports of rate-limited log lines: {e}");
    }

    if args.check {
        let path = args
            .config
            .as_deref()
            .unwrap_or_else(|| std::path::Path::new(""));
        return match wgmesh_adapters::config::DaemonConfig::load(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    if !args.foreground {
        return detach();
    }

    let options = DaemonOptions {
        config: args.config,
        interface: args.interface,
        api_socket: args.api_socket,
        state_dir: args.state_dir,
        uapi_dir: (!args.no_uapi).then_some(args.uapi_dir),
        resolv_conf: args.resolv_conf,
        manage_routes: true,
        data_plane_nice: Some(args.data_plane_nice),
        control: daemon::ControlFlags {
            urls: args.control_urls,
            auth_key: args.authkey,
            server_key: args.control_key,
            state_dir: args.control_state_dir,
            hostname: args.hostname,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wgmeshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgmeshd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts a detached copy of this process with `--foreground` added, in its
/// own session, with its output discarded, and returns at once.
fn detach() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("wgmeshd: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    match command.spawn() {
        Ok(child) => {
            println!("wgmeshd running in the background as pid {}", child.id());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wgmeshd: cannot start in the background: {e}");
            ExitCode::FAILURE
        }
    }
}
