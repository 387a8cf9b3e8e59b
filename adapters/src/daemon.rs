//! The daemon `wgmeshd`: wires the engine, the driver loop, the Linux
//! devices, the OS manager, the local API and the signals together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand_core::OsRng;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use wgmesh_core::{DiscoPrivateKey, Engine, InputError, NodePrivateKey};

use crate::api::{self, ApiContext, ReloadRequest};
use crate::config::{ConfigError, DaemonConfig, DnsMode};
use crate::desired::{ChangeError, Desired, DesiredState, empty_reconfig, new_engine};
use crate::dns::{DnsManager, detect};
use crate::driver::{
    Driver, DriverError, DriverExit, DriverHandle, DriverOptions, RequestError, TokioClock,
};
use crate::fastpath::{DataTun, DataUdp};
use crate::os::OsManager;
use crate::router::{self, NetlinkRouter};
use crate::uapi;

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The config file; `None` starts empty (configured through UAPI).
    pub config: Option<PathBuf>,
    /// The interface name (overrides the file's).
    pub interface: Option<String>,
    /// The API socket (default `<state_dir>/<interface>.sock`).
    pub api_socket: Option<PathBuf>,
    /// Where the state file, the API socket and the DNS backup live.
    pub state_dir: PathBuf,
    /// Where the WireGuard UAPI socket goes (`None`: no UAPI).
    pub uapi_dir: Option<PathBuf>,
    /// The resolv.conf to manage.
    pub resolv_conf: PathBuf,
    /// Apply routes and addresses (off only for unprivileged experiments).
    pub manage_routes: bool,
    /// The nice value of the data-plane thread (`None`: leave it as
    /// inherited). See [`DEFAULT_DATA_PLANE_NICE`].
    pub data_plane_nice: Option<i32>,
    /// `--control` and its companion flags (empty: none given).
    pub control: ControlFlags,
}

/// The command line's control flags: `--control URL` (repeatable, one per
/// replica), `--authkey`, `--control-key`, `--control-state-dir`. With a
/// config file that has `[control]` they override its `url` and auth key;
/// without a config file they make a control-only node.
#[derive(Debug, Clone, Default)]
pub struct ControlFlags {
    /// Server URLs.
    pub urls: Vec<String>,
    /// The pre-auth key.
    pub auth_key: Option<String>,
    /// The pinned server public key (base64).
    pub server_key: Option<String>,
    /// Where the node key is kept.
    pub state_dir: Option<PathBuf>,
    /// The host name to register with.
    pub hostname: Option<String>,
}

impl ControlFlags {
    /// Whether any control flag was given.
    pub fn any(&self) -> bool {
        !self.urls.is_empty()
            || self.auth_key.is_some()
            || self.server_key.is_some()
            || self.state_dir.is_some()
            || self.hostname.is_some()
    }
}

/// Applies the control flags to the loaded config (or makes a control-only
/// config when there is no file).
fn apply_control_flags(
    config: Option<DaemonConfig>,
    flags: &ControlFlags,
) -> Result<Option<DaemonConfig>, DaemonError> {
    use crate::control_client::settings::{
        ControlSettings, ControlUrl, DEFAULT_STATE_DIR, parse_server_key,
    };
    if !flags.any() {
        return Ok(config);
    }
    let flag_error = |message: String| DaemonError::ControlFlags(message);
    let urls = flags
        .urls
        .iter()
        .map(|u| ControlUrl::parse(u))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| flag_error(format!("--control: {e}")))?;
    let server_key = flags
        .server_key
        .as_deref()
        .map(parse_server_key)
        .transpose()
        .map_err(|e| flag_error(format!("--control-key: {e}")))?;
    if let Some(h) = &flags.hostname {
        if !crate::magicdns::is_valid_label(h) {
            return Err(flag_error(format!(
                "--hostname: {h:?} is not a single valid DNS label"
            )));
        }
    }
    match config {
        Some(mut config) => {
            let Some(control) = config.control.as_mut() else {
                return Err(flag_error(
                    "--control and its flags need a config file with a [control] section, or no \
                     config file at all (static peers and control cannot be combined)"
                        .into(),
                ));
            };
            if !urls.is_empty() {
                control.urls = urls;
            }
            if let Some(key) = server_key {
                control.server_key = key;
            }
            if let Some(auth) = &flags.auth_key {
                control.auth_key = Some(auth.clone());
            }
            if let Some(dir) = &flags.state_dir {
                control.state_dir = dir.clone();
            }
            if let Some(h) = &flags.hostname {
                control.hostname = h.clone();
            }
            Ok(Some(config))
        }
        None => {
            if urls.is_empty() {
                return Err(flag_error(
                    "--control URL is required with the control flags".into(),
                ));
            }
            let Some(server_key) = server_key else {
                return Err(flag_error(
                    "--control-key KEY is required with --control (the server's public key, \
                     pinned)"
                        .into(),
                ));
            };
            let hostname = flags
                .hostname
                .clone()
                .unwrap_or_else(crate::magicdns::system_hostname);
            let settings = ControlSettings {
                urls,
                server_key,
                auth_key: flags.auth_key.clone(),
                state_dir: flags
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
                hostname: if hostname.is_empty() {
                    "node".into()
                } else {
                    hostname
                },
            };
            DaemonConfig::for_control(settings)
                .map(Some)
                .map_err(|e| flag_error(e.to_string()))
        }
    }
}

/// The data-plane thread's default nice value: the highest priority short of
/// a real-time class.
///
/// The kernel runs its own network stack (softirqs) ahead of every process;
/// a userspace tunnel that competes with the applications it carries on
/// equal terms becomes the place where their packets queue. With a bulk TCP
/// transfer and the tunnel on the same two cores, the tunnel's queues (the
/// TUN ring and the peer's UDP socket, both first-in first-out) held about a
/// millisecond of data, and a ping waited behind it (loaded RTT 3.7x idle);
/// with the data-plane thread at -20 the applications are what waits for the
/// CPU, the tunnel's queues stay short, and the loaded RTT is 0.9-1.0x idle
/// at the same throughput (`just bench-throughput`, bench/throughput/README.md).
/// The thread sleeps when there is no traffic, so the priority costs nothing
/// then; a flood can take a core from ordinary processes, as kernel
/// networking does.
pub const DEFAULT_DATA_PLANE_NICE: i32 = -20;

/// Sets the calling thread's nice value (on Linux, `setpriority` with a
/// thread id affects that thread only; threads it starts inherit it).
fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority reads only its integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The data-plane thread's scheduler slice by default, in microseconds
/// (`WGMESH_DATA_PLANE_SLICE_US`; 0: the kernel's default slice).
///
/// On Linux 6.12 and later (EEVDF, `sched_runtime` of `SCHED_OTHER`; the
/// kernel keeps it within 100 µs..100 ms) a shorter slice gives a thread no
/// larger share of the CPU, only earlier deadlines: woken by a packet, the
/// data-plane thread preempts a CPU-bound task sooner instead of waiting
/// for the end of that task's slice. With four TCP flows through the tunnel
/// on the 2-core bench machine the daemons sleep and wake about a thousand
/// times a second, and each wake-up waited 350-370 µs for a CPU at the
/// kernel's default slice, 190-210 µs at 100 µs; a sparse ping's loaded RTT
/// fell from 3.2-13 x idle to 1.0-2.3 x in six A/B invocations, 4-flow
/// throughput -7% to +19%. But a single flow lost 13-34% of its throughput in
/// three (the daemons then preempt the one iperf3 thread that limits it),
/// so the default leaves the kernel's slice (`bench/throughput/README.md`).
/// Earlier kernels ignore the setting.
pub const DEFAULT_DATA_PLANE_SLICE_US: u64 = 0;

/// The slice to ask for: `WGMESH_DATA_PLANE_SLICE_US` when it is a number
/// (a value that is not is logged and ignored), otherwise
/// [`DEFAULT_DATA_PLANE_SLICE_US`]; `None` for 0.
fn data_plane_slice(value: Option<u64>) -> Option<u64> {
    let us = value.unwrap_or(DEFAULT_DATA_PLANE_SLICE_US);
    (us > 0).then_some(us)
}

/// Sets the calling thread's scheduler slice (`sched_setattr` with
/// `SCHED_OTHER`, keeping its nice value).
fn set_current_thread_slice(slice_us: u64) -> std::io::Result<()> {
    /// `struct sched_attr`, its first version (48 bytes).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: getpriority reads only its integer arguments. (-1 is also a
    // valid nice value; it is kept either way.)
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice_us.saturating_mul(1000),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: the kernel reads `size` bytes of a live, initialised
    // sched_attr; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The relay settings could not be used (the secret file, ...).
    #[error("{0}")]
    Relay(String),
    /// The TUN device could not be opened.
    #[error("TUN device {name}: {source}")]
    Tun {
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The UDP socket could not be bound.
    #[error("UDP port {port}: {source}")]
    Socket {
        /// The port.
        port: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A local socket (API, UAPI, metrics) could not be set up.
    #[error("{what}: {source}")]
    Local {
        /// Which one.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A control socket (API or UAPI) could not be set up safely.
    #[error(transparent)]
    LocalSocket(#[from] crate::localsock::LocalSocketError),
    /// Netlink could not be opened.
    #[error(transparent)]
    Router(#[from] router::RouterError),
    /// The engine refused the config.
    #[error("config refused by the engine: {0}")]
    Refused(#[from] InputError),
    /// The driver loop failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The driver stopped unexpectedly.
    #[error("the driver stopped unexpectedly")]
    DriverStopped,
    /// The MagicDNS resolver could not start.
    #[error(transparent)]
    MagicDns(#[from] crate::magicdns::MagicDnsError),
    /// The control flags are inconsistent.
    #[error("{0}")]
    ControlFlags(String),
    /// The node key for control could not be loaded or stored.
    #[error(transparent)]
    NodeKey(#[from] crate::control_client::settings::NodeKeyError),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let config = match &options.config {
        Some(path) => Some(DaemonConfig::load(path)?),
        None => None,
    };
    let config = apply_control_flags(config, &options.control)?;
    let control_settings = config.as_ref().and_then(|c| c.control.clone());
    let interface = options
        .interface
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.file.interface.name.clone()))
        .unwrap_or_else(|| "wgmesh0".to_owned());
    let private_key = match &control_settings {
        // The node key joins the tailnet: stored once, reused at every start.
        Some(control) => {
            crate::control_client::settings::load_or_create_node_key(&control.state_dir)?
        }
        None => config
            .as_ref()
            .map(|c| c.private_key.clone())
            .unwrap_or_else(|| NodePrivateKey::generate(&mut OsRng)),
    };
    let disco_key = config
        .as_ref()
        .and_then(|c| c.file.interface.disco_private_key.clone())
        .unwrap_or_else(|| DiscoPrivateKey::generate(&mut OsRng));
    let reconfig = config
        .as_ref()
        .map(DaemonConfig::reconfig)
        .unwrap_or_else(|| empty_reconfig(0));
    let listen_port = reconfig.wireguard.as_ref().map_or(0, |w| w.listen_port);
    let mtu = reconfig
        .router
        .as_ref()
        .map_or(1280, |r| if r.mtu == 0 { 1280 } else { r.mtu });
    let dns_mode = config.as_ref().map_or(DnsMode::Off, |c| c.file.dns.mode);

    // Connections to the metrics listener and the sockets must not run the
    // daemon out of descriptors at the inherited (often 1024) soft limit.
    crate::localsock::raise_nofile_limit();
    let access = crate::localsock::SocketAccess::with_group_name(
        config.as_ref().and_then(|c| c.file.api.group.as_deref()),
    )?;
    let api_path = api_socket_path(&options, config.as_ref(), &interface);

    // The OS side first: clean up after a crashed run before creating anything.
    // The API socket and the resolv.conf backup live here: root only (the
    // API's group may traverse it when the socket is inside).
    let state_group = access
        .read_group
        .filter(|_| api_path.parent() == Some(options.state_dir.as_path()));
    crate::localsock::prepare_directory(&options.state_dir, 0o700, state_group)?;
    let state_path = options.state_dir.join(format!("{interface}.state"));
    let dns = DnsManager::new(
        detect(dns_mode, &options.resolv_conf),
        &interface,
        options.resolv_conf.clone(),
        options.state_dir.join(format!("{interface}.resolv.bak")),
    );
    let bird = config
        .as_ref()
        .and_then(|c| c.file.bird.socket.clone())
        .map(crate::bird::BirdClient::new);
    let router = if options.manage_routes {
        Some(NetlinkRouter::new(router::connect()?, &interface))
    } else {
        None
    };
    let mut os = OsManager::new(&interface, router, dns, bird, state_path);
    os.recover().await;
    // MagicDNS forwards to the resolvers the host used before wgmeshd: read
    // them now, after a crashed run's resolv.conf was restored and before
    // the DNS effect rewrites it.
    let magicdns_section = config
        .as_ref()
        .map(|c| c.file.magicdns.clone())
        .filter(|m| m.enable);
    let host_upstreams = match &magicdns_section {
        Some(_) => crate::magicdns::host_upstreams(&options.resolv_conf),
        None => Vec::new(),
    };

    let engine = new_engine(private_key.clone(), disco_key, &interface);
    let engine_disco_key = engine.disco_key();
    info!(node_key = %engine.node_key(), disco_key = %engine.disco_key(), "engine created");
    // The relay (TURN) sits under the engine, in the driver's socket.
    let relay_at_start = config
        .as_ref()
        .and_then(|c| c.file.relay.as_ref().map(|r| r.get_ref().clone()));
    let relay = match &config {
        Some(config) => {
            let node_name = engine.node_key().to_string().replace(':', "-");
            config
                .relay_settings(&node_name)
                .map_err(DaemonError::Relay)?
        }
        None => None,
    };

    // What the relay does (credentials rejected, ...), seen by the control
    // client while the driver thread owns the socket.
    let relay_monitor = Arc::new(crate::relay::RelayMonitor::default());

    // The effects wait in the channel until the OS manager runs; it starts
    // once the driver's handle exists, so that it can report how each
    // effect fared back to the engine's health.
    let (effects_tx, effects_rx) = mpsc::unbounded_channel();
    let (handle, bound, mut driver_exit) = spawn_driver_thread(
        engine,
        interface.clone(),
        mtu,
        listen_port,
        effects_tx,
        options.data_plane_nice,
        RelayStart {
            settings: relay,
            monitor: Arc::clone(&relay_monitor),
        },
    )
    .await?;
    os.report_health_to(handle.health_reporter());
    let os_task = tokio::spawn(os.run(effects_rx));

    // The listen port actually bound goes into the config the engine sees,
    // so status and UAPI show it.
    let mut reconfig = reconfig;
    if let (Some(wg), Some(bound)) = (reconfig.wireguard.as_mut(), bound) {
        if wg.listen_port == 0 {
            wg.listen_port = bound.port();
        }
    }
    // An exit node in use: the socket is marked before the default routes
    // go in, so that its datagrams never take them.
    let fwmark = crate::exitnode::socket_mark_for(&reconfig, 0);
    if fwmark != 0 {
        match handle.set_fwmark(fwmark).await {
            Ok(Ok(())) => info!(fwmark, "socket marked to bypass the exit node's routes"),
            Ok(Err(e)) => {
                warn!(fwmark, error = %e, "could not mark the socket; its datagrams may loop into the tunnel")
            }
            Err(_) => return Err(DaemonError::DriverStopped),
        }
    }
    let _ = handle
        .reconfig(reconfig.clone())
        .await
        .map_err(|e| match e {
            RequestError::Refused(e) => DaemonError::Refused(e),
            RequestError::Stopped => DaemonError::DriverStopped,
        })?;
    // NAT traversal: the STUN servers, then this host's local endpoints
    // (the engine reports both with the reflexive address it finds).
    if let Some(config) = &config {
        handle
            .set_nat(config.nat_config())
            .await
            .map_err(|e| match e {
                RequestError::Refused(e) => DaemonError::Refused(e),
                RequestError::Stopped => DaemonError::DriverStopped,
            })?;
    }
    if crate::nat::report_local_endpoints(&handle, &interface)
        .await
        .is_err()
    {
        return Err(DaemonError::DriverStopped);
    }
    let magicdns = match &magicdns_section {
        Some(section) => {
            let netlink = if options.manage_routes {
                Some(router::connect()?)
            } else {
                None
            };
            let started = crate::magicdns::MagicDns::start(
                &interface,
                netlink,
                section,
                &reconfig,
                host_upstreams,
            );
            Some(Arc::new(started.await?))
        }
        None => None,
    };
    let private_key_for_control = private_key.clone();
    let desired = Arc::new(DesiredState::new(
        handle.clone(),
        interface.clone(),
        Desired {
            private_key,
            reconfig,
            fwmark,
        },
    ));

    // The local API.
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let listener = api::bind_api_socket(&api_path, access)?;
    let context = ApiContext::new(handle.clone(), interface.clone(), reload_tx, access);
    // The control client: the node's netmap comes from the server.
    let control_status: Option<crate::control_client::task::SharedControlStatus> =
        control_settings.as_ref().map(|_| Arc::default());
    let context = Arc::new(match &control_status {
        Some(status) => context.with_control(status.clone()),
        None => context,
    });
    let control_task = match (control_settings, &control_status) {
        (Some(settings), Some(status)) => {
            let snapshot = desired.snapshot().await;
            let running = &snapshot.reconfig;
            let local = crate::control_client::convert::LocalSettings {
                listen_port: running.wireguard.as_ref().map_or(0, |w| w.listen_port),
                mtu: running.router.as_ref().map_or(0, |r| r.mtu),
                knobs: running.knobs.clone(),
                magicdns: magicdns.is_some(),
            };
            info!(urls = ?settings.urls.iter().map(|u| u.text.as_str()).collect::<Vec<_>>(), "joining the tailnet through control");
            let client = crate::control_client::task::ControlClient {
                settings,
                node_key: private_key_for_control.clone(),
                disco_key: engine_disco_key,
                desired: desired.clone(),
                handle: handle.clone(),
                local,
                interface: interface.clone(),
                magicdns: magicdns.clone().zip(magicdns_section.clone()),
                status: status.clone(),
                relay_monitor: Arc::clone(&relay_monitor),
                nat_applied: Default::default(),
            };
            Some(tokio::spawn(client.run()))
        }
        _ => None,
    };
    let api_task = tokio::spawn(api::serve_api(listener, context.clone()));
    let metrics_task =
        config
            .as_ref()
            .and_then(|c| c.file.api.metrics_listen)
            .map(|addr: SocketAddr| {
                let context = context.clone();
                tokio::spawn(async move {
                    if let Err(e) = api::serve_metrics(addr, context).await {
                        error!(%addr, error = %e, "metrics listener failed");
                    }
                })
            });

    // The WireGuard UAPI socket.
    let uapi_enabled = config
        .as_ref()
        .and_then(|c| c.file.api.uapi)
        .unwrap_or(true);
    let mut uapi_path = None;
    let uapi_task = match (&options.uapi_dir, uapi_enabled) {
        (Some(dir), true) => {
            let path = dir.join(format!("{interface}.sock"));
            // The directory is 0755 as for wireguard-go (`wg` lists it); the
            // socket itself is root's only.
            let listener =
                crate::localsock::bind(&path, 0o755, crate::localsock::SocketAccess::default())?;
            uapi_path = Some(path);
            Some(tokio::spawn(uapi::serve(
                listener,
                handle.clone(),
                desired.clone(),
            )))
        }
        _ => None,
    };

    // The flow log.
    let flowlog_task = config
        .as_ref()
        .and_then(|c| {
            c.file
                .flowlog
                .path
                .clone()
                .map(|p| (p, c.file.flowlog.interval_secs))
        })
        .map(|(path, secs)| {
            let interval = Duration::from_secs(secs.unwrap_or(10));
            tokio::spawn(crate::flowlog::run(handle.clone(), path, interval))
        });

    // The link monitor.
    let monitor_task = if options.manage_routes {
        match crate::linkmon::spawn(interface.clone(), handle.clone()) {
            Ok(task) => Some(task),
            Err(e) => {
                warn!(error = %e, "no link monitor");
                None
            }
        }
    } else {
        None
    };

    let local = |what: &str, source| DaemonError::Local {
        what: what.to_owned(),
        source,
    };
    let mut hup = signal(SignalKind::hangup()).map_err(|e| local("SIGHUP handler", e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| local("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| local("SIGINT handler", e))?;
    info!(interface = %interface, api = %api_path.display(), "wgmeshd running");

    let result = loop {
        tokio::select! {
            biased;
            _ = term.recv() => { info!("SIGTERM: shutting down"); break Ok(()); }
            _ = int.recv() => { info!("SIGINT: shutting down"); break Ok(()); }
            _ = hup.recv() => {
                match reload(&options, &desired, magicdns.as_deref(), control_status.is_some(), relay_at_start.as_ref()).await {
                    Ok(message) => info!(%message, "reloaded on SIGHUP"),
                    Err(message) => error!(%message, "reload refused; the running config stays"),
                }
            }
            Some(reply) = reload_rx.recv() => {
                let outcome = reload(&options, &desired, magicdns.as_deref(), control_status.is_some(), relay_at_start.as_ref()).await;
                if let Err(message) = &outcome {
                    error!(%message, "reload refused; the running config stays");
                }
                let _ = reply.send(outcome);
            }
            exit = &mut driver_exit => {
                break match exit {
                    Ok(Ok(_)) => Err(DaemonError::DriverStopped),
                    Ok(Err(e)) => Err(DaemonError::Driver(e)),
                    Err(_) => Err(DaemonError::DriverStopped),
                };
            }
        }
    };

    // Shutdown, in order: stop taking requests, close the engine (its last
    // effects withdraw routes and DNS), wait for the OS manager to finish.
    api_task.abort();
    drop(magicdns);
    for task in [
        metrics_task,
        uapi_task,
        monitor_task,
        flowlog_task,
        control_task,
    ]
    .into_iter()
    .flatten()
    {
        task.abort();
    }
    if result.is_ok() {
        close(&handle).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut driver_exit).await;
    }
    drop(handle);
    drop(context);
    if tokio::time::timeout(Duration::from_secs(10), os_task)
        .await
        .is_err()
    {
        warn!("the OS manager did not finish in time");
    }
    let _ = std::fs::remove_file(&api_path);
    if let Some(path) = uapi_path {
        let _ = std::fs::remove_file(path);
    }
    info!("wgmeshd stopped");
    result
}

/// Where the API socket goes: the command line's `--api-socket`, else the
/// file's `[api] socket`, else `<state_dir>/<interface>.sock`.
fn api_socket_path(
    options: &DaemonOptions,
    config: Option<&DaemonConfig>,
    interface: &str,
) -> PathBuf {
    options
        .api_socket
        .clone()
        .or_else(|| config.and_then(|c| c.file.api.socket.clone()))
        .unwrap_or_else(|| api::default_socket(&options.state_dir, interface))
}

/// The relay the driver's socket starts with.
struct RelayStart {
    /// A node-local `[relay]`'s settings; `None` with no relay yet (a node
    /// joined to control gets its settings later).
    settings: Option<crate::relay::RelaySettings>,
    /// What the relay reports to the rest of the daemon.
    monitor: Arc<crate::relay::RelayMonitor>,
}

/// What the driver thread reports when its loop ends.
type DriverExitReceiver = oneshot::Receiver<Result<DriverExit, DriverError>>;

/// Opens the TUN and the UDP socket and runs the driver loop on a thread of
/// its own, with its own single-threaded runtime. The data path then never
/// competes with the API, netlink or signal handling for a worker, and a
/// driver that stops making progress cannot keep the daemon from reacting to
/// SIGTERM (the shutdown path bounds every wait on it).
async fn spawn_driver_thread(
    engine: Engine,
    interface: String,
    mtu: u16,
    listen_port: u16,
    effects: mpsc::UnboundedSender<wgmesh_core::Effect>,
    nice: Option<i32>,
    relay: RelayStart,
) -> Result<(DriverHandle, Option<SocketAddr>, DriverExitReceiver), DaemonError> {
    type Ready = Result<(DriverHandle, Option<SocketAddr>), DaemonError>;
    let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
    let (exit_tx, exit_rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("wgmesh-driver".into())
        .spawn(move || {
            if let Some(nice) = nice {
                match set_current_thread_nice(nice) {
                    Ok(()) => info!(nice, "data-plane thread priority set"),
                    // Without CAP_SYS_NICE the thread keeps running, only
                    // without the precedence over applications.
                    Err(e) => {
                        warn!(nice, error = %e, "cannot set the data-plane thread's priority")
                    }
                }
            }
            let slice: Option<u64> =
                crate::fastpath::options::env_number("WGMESH_DATA_PLANE_SLICE_US");
            if let Some(slice_us) = data_plane_slice(slice) {
                match set_current_thread_slice(slice_us) {
                    Ok(()) => info!(slice_us, "data-plane thread slice set"),
                    // A kernel without sched_setattr (or a sandbox that
                    // refuses it) keeps its default slice.
                    Err(e) => {
                        info!(slice_us, error = %e, "cannot set the data-plane thread's slice")
                    }
                }
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(source) => {
                    let _ = ready_tx.send(Err(DaemonError::Local {
                        what: "driver runtime".into(),
                        source,
                    }));
                    return;
                }
            };
            runtime.block_on(async move {
                let tun = match DataTun::open(&interface, mtu) {
                    Ok(tun) => tun,
                    Err(source) => {
                        let _ = ready_tx.send(Err(DaemonError::Tun {
                            name: interface,
                            source,
                        }));
                        return;
                    }
                };
                let socket = match DataUdp::bind(listen_port, &tun) {
                    Ok(socket) => socket,
                    Err(source) => {
                        let _ = ready_tx.send(Err(DaemonError::Socket {
                            port: listen_port,
                            source,
                        }));
                        return;
                    }
                };
                let socket = crate::relay::RelaySocket::new(socket, relay.settings, relay.monitor);
                let bound = crate::driver::DatagramSocket::local_addr(&socket).ok();
                info!(interface = %tun.name(), ?bound, "devices ready");
                let (driver, handle) = Driver::new(
                    engine,
                    tun,
                    socket,
                    TokioClock,
                    effects,
                    DriverOptions::default(),
                );
                let _ = ready_tx.send(Ok((handle, bound)));
                let _ = exit_tx.send(driver.run().await);
            });
        });
    if let Err(source) = spawned {
        return Err(DaemonError::Local {
            what: "driver thread".into(),
            source,
        });
    }
    let (handle, bound) = ready_rx.await.map_err(|_| DaemonError::DriverStopped)??;
    Ok((handle, bound, exit_rx))
}

async fn close(handle: &DriverHandle) {
    if tokio::time::timeout(Duration::from_secs(5), handle.close())
        .await
        .is_err()
    {
        warn!("the engine did not close in time");
    }
}

/// Why a reloaded config file was not applied (before the engine saw it).
#[derive(Debug, thiserror::Error)]
enum ReloadRefused {
    /// The file names another private key than the running engine's.
    #[error("{path}: the private key changed; restart wgmeshd to use a new key")]
    KeyChanged {
        /// The config file.
        path: String,
    },
    /// `[relay]` changed: the allocation is made at start.
    #[error("{path}: [relay] changed; restart wgmeshd to use another relay")]
    RelayChanged {
        /// The config file.
        path: String,
    },
    /// `magicdns.enable` changed: the resolver starts and stops with the daemon.
    #[error("{path}: magicdns.enable changed; restart wgmeshd to start or stop MagicDNS")]
    MagicDnsToggled {
        /// The config file.
        path: String,
    },
}

/// Re-reads the config file and applies it; a bad file changes nothing. A
/// file without a listen port keeps the running one.
async fn reload(
    options: &DaemonOptions,
    desired: &DesiredState,
    magicdns: Option<&crate::magicdns::MagicDns>,
    control_mode: bool,
    relay_at_start: Option<&crate::config::RelaySection>,
) -> Result<String, String> {
    if control_mode {
        return Err(
            "this node follows its control server: peers and addresses come from there, and \
             [control] is read at start (restart wgmeshd to change it)"
                .into(),
        );
    }
    let Some(path) = &options.config else {
        return Err("wgmeshd was started without a config file; nothing to reload".into());
    };
    let config = DaemonConfig::load(path).map_err(|e| e.to_string())?;
    let outcome = desired
        .change(|d| {
            if config.private_key != d.private_key {
                return Err(ReloadRefused::KeyChanged {
                    path: path.display().to_string(),
                });
            }
            if config.file.relay.as_ref().map(|r| r.get_ref()) != relay_at_start {
                return Err(ReloadRefused::RelayChanged {
                    path: path.display().to_string(),
                });
            }
            if config.file.magicdns.enable != magicdns.is_some() {
                return Err(ReloadRefused::MagicDnsToggled {
                    path: path.display().to_string(),
                });
            }
            let running_port = d.reconfig.wireguard.as_ref().map_or(0, |w| w.listen_port);
            let mut reconfig = config.reconfig();
            if let Some(wg) = reconfig.wireguard.as_mut() {
                if wg.listen_port == 0 {
                    wg.listen_port = running_port;
                }
            }
            d.fwmark = crate::exitnode::socket_mark_for(&reconfig, d.fwmark);
            d.reconfig = reconfig;
            Ok(())
        })
        .await
        .map_err(|e| match e {
            ChangeError::Edit(refused) => refused.to_string(),
            ChangeError::Engine(e) => format!("{}: {e}", path.display()),
            ChangeError::Fwmark(e) => format!("{}: {e}", path.display()),
        })?;
    // The NAT settings were checked with the file; the engine checks them
    // again and keeps the old ones if it refuses.
    if let Err(e) = desired.driver().set_nat(config.nat_config()).await {
        return Err(format!("{}: NAT settings: {e}", path.display()));
    }
    if let Some(magicdns) = magicdns {
        let applied = desired.snapshot().await;
        magicdns.update(&config.file.magicdns, &applied.reconfig);
    }
    Ok(format!("{}: {outcome:?}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's own nice value, read back from the kernel.
    fn current_thread_nice() -> i32 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // SAFETY: getpriority reads only its integer arguments. Its -1 is
        // also a valid nice value, but none of these tests uses -1.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    #[test]
    fn the_data_plane_slice_is_the_kernel_s_unless_asked() {
        assert_eq!(DEFAULT_DATA_PLANE_SLICE_US, 0);
        assert_eq!(data_plane_slice(None), None);
        assert_eq!(data_plane_slice(Some(250)), Some(250));
        assert_eq!(data_plane_slice(Some(0)), None);
    }

    #[test]
    fn a_thread_keeps_its_nice_value_when_its_slice_is_set() {
        // On a thread of its own: the nice value and slice stay with it.
        std::thread::spawn(|| {
            let before = current_thread_nice();
            if set_current_thread_slice(100).is_ok() {
                assert_eq!(current_thread_nice(), before);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_api_socket_comes_from_the_flag_then_the_file_then_the_state_dir() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let text = format!(
            "[interface]\nprivate_key = \"{key}\"\n[api]\nsocket = \"/run/wgm-api/x.sock\"\n"
        );
        let config = DaemonConfig::parse(std::path::Path::new("x.toml"), &text).unwrap();
        let mut options = DaemonOptions {
            control: ControlFlags::default(),
            config: None,
            interface: None,
            api_socket: None,
            state_dir: PathBuf::from("/run/wgmesh"),
            uapi_dir: None,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            manage_routes: false,
            data_plane_nice: None,
        };
        assert_eq!(
            api_socket_path(&options, Some(&config), "wg0"),
            PathBuf::from("/run/wgm-api/x.sock")
        );
        assert_eq!(
            api_socket_path(&options, None, "wg0"),
            PathBuf::from("/run/wgmesh/wg0.sock")
        );
        options.api_socket = Some(PathBuf::from("/tmp/flag.sock"));
        assert_eq!(
            api_socket_path(&options, Some(&config), "wg0"),
            PathBuf::from("/tmp/flag.sock")
        );
    }

    #[test]
    fn the_nice_value_applies_to_the_calling_thread_and_the_threads_it_starts() {
        // Raising the nice value (lowering priority) needs no privilege.
        let before = current_thread_nice();
        let (set, inherited) = std::thread::spawn(|| {
            set_current_thread_nice(7).expect("raising the nice value is always allowed");
            let inherited = std::thread::spawn(current_thread_nice)
                .join()
                .expect("inner thread");
            (current_thread_nice(), inherited)
        })
        .join()
        .expect("thread");
        assert_eq!(set, 7);
        assert_eq!(inherited, 7, "threads started afterwards inherit it");
        assert_eq!(current_thread_nice(), before, "other threads keep theirs");
    }
}
