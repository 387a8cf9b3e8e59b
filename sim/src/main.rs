//! `wgmesh-sim`: run, replay and explore simulated tailnets.
//!
//! Exit codes of `run`: 0 when every expectation held, 1 when one failed,
//! 2 for a bad file or an unavailable backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wgmesh_sim::report::Report;
use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::timeline::{self, Window};
use wgmesh_sim::trace::Keep;

#[derive(Parser)]
#[command(name = "wgmesh-sim", about = "Whole wgmesh tailnets on virtual time.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and check its expectations.
    Run {
        /// The scenario file.
        file: PathBuf,
        /// Overrides the file's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Overrides the file's backend (event or turmoil).
        #[arg(long)]
        backend: Option<String>,
        /// End with one JSON object describing the run.
        #[arg(long)]
        json: bool,
    },
    /// Run a scenario and print its per-node timeline.
    Replay {
        /// The scenario file.
        file: PathBuf,
        /// Overrides the file's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Overrides the file's backend (event or turmoil).
        #[arg(long)]
        backend: Option<String>,
        /// Also draw the run as an SVG swimlane picture into this file.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// The picture starts at this virtual second (default: 0).
        #[arg(long, requires = "svg")]
        from: Option<f64>,
        /// The picture ends at this virtual second (default: the run's end).
        #[arg(long, requires = "svg")]
        to: Option<f64>,
    },
    /// Measure virtual seconds per wall second on the reference scenarios.
    Speed {
        /// The directory holding the scenarios.
        #[arg(long, default_value = "sim/scenarios")]
        dir: PathBuf,
    },
    /// Run random scenarios, shrink failures and write them to corpus/.
    Explore {
        /// How many cases.
        #[arg(long, default_value_t = 20)]
        cases: u64,
        /// The exploration's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where failing cases are written.
        #[arg(long, default_value = "corpus")]
        corpus: PathBuf,
    },
}

fn load(file: &std::path::Path) -> Result<Scenario, ExitCode> {
    Scenario::from_file(file).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn execute(scenario: &Scenario, options: RunOptions) -> Result<Report, ExitCode> {
    run(scenario, options).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// The backend named on the command line, if any; an unknown name is an
/// error (exit 2).
fn parse_backend(backend: Option<String>) -> Result<Option<Backend>, ExitCode> {
    match backend.as_deref().map(|b| (b, Backend::parse(b))) {
        None => Ok(None),
        Some((_, Some(b))) => Ok(Some(b)),
        Some((b, None)) => {
            eprintln!("error: unknown backend {b:?} (event or turmoil)");
            Err(ExitCode::from(2))
        }
    }
}

fn cmd_run(file: PathBuf, seed: Option<u64>, backend: Option<String>, json: bool) -> ExitCode {
    let backend = match parse_backend(backend) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let scenario = match load(&file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let seed = seed.unwrap_or(scenario.seed);
    println!("seed: {seed}");
    let report = match execute(
        &scenario,
        RunOptions {
            seed: Some(seed),
            backend,
            keep: Keep::Notable,
        },
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    println!("scenario: {} ({})", scenario.name, file.display());
    if !scenario.description.is_empty() {
        for line in scenario.description.lines() {
            println!("  {line}");
        }
    }
    if let Some(bug) = &scenario.known_bug {
        println!("  known bug (this scenario is expected to fail): {bug}");
    }
    println!(
        "backend: {}, {} nodes, {} virtual seconds",
        report.backend,
        scenario.nodes.len(),
        report.virtual_secs
    );
    println!("\ntimeline:");
    print!("{}", timeline::summary_text(&report.timeline, 80));
    println!("\nchecks:");
    print!("{}", report.checks_text());
    let metrics: Vec<String> = report
        .metrics
        .iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("\nmetrics: {}", metrics.join(" "));
    println!("trace hash: {}", report.trace_hash);
    println!(
        "speed: {:.0} virtual s in {:.3} wall s ({:.0}x real time)",
        report.virtual_secs,
        report.wall_secs,
        report.speed()
    );
    println!("result: {}", if report.passed { "PASS" } else { "FAIL" });
    if json {
        println!("{}", report.to_json());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The picture's window from `--from`/`--to` (seconds), checked against
/// the run's length.
fn window(from: Option<f64>, to: Option<f64>, duration: Duration) -> Result<Window, String> {
    let secs = |v: f64, what: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!(
                "--{what} must be a number of seconds >= 0, not {v}"
            ))
        }
    };
    let from = from.map_or(Ok(Duration::ZERO), |v| secs(v, "from"))?;
    let to = to.map_or(Ok(duration), |v| secs(v, "to"))?;
    if from >= to {
        return Err(format!(
            "--from ({}s) must be before --to ({}s)",
            from.as_secs_f64(),
            to.as_secs_f64()
        ));
    }
    if from > duration {
        return Err(format!(
            "--from ({}s) is after the run's end ({}s)",
            from.as_secs_f64(),
            duration.as_secs_f64()
        ));
    }
    Ok(Window { from, to })
}

fn cmd_replay(
    file: PathBuf,
    seed: Option<u64>,
    backend: Option<String>,
    svg: Option<PathBuf>,
    (from, to): (Option<f64>, Option<f64>),
) -> ExitCode {
    let backend = match parse_backend(backend) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let scenario = match load(&file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let window = match window(from, to, scenario.duration) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = seed.unwrap_or(scenario.seed);
    println!("seed: {seed}");
    let keep = if svg.is_some() {
        Keep::All
    } else {
        Keep::Notable
    };
    let report = match execute(
        &scenario,
        RunOptions {
            seed: Some(seed),
            backend,
            keep,
        },
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
    print!("{}", timeline::per_node_text(&report.timeline, &names));
    println!("\nchecks:");
    print!("{}", report.checks_text());
    println!("trace hash: {}", report.trace_hash);
    if let Some(path) = svg {
        let picture = timeline::svg(&report.timeline, &names, window);
        if let Err(e) = std::fs::write(&path, picture) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("swimlanes written to {}", path.display());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn cmd_explore(cases: u64, seed: u64, corpus: PathBuf) -> ExitCode {
    println!("seed: {seed}");
    let (outcomes, written) = wgmesh_sim::explore::explore(cases, seed, &corpus, true);
    let failing = outcomes.iter().filter(|o| !o.report.passed).count();
    let virtual_secs: f64 = outcomes.iter().map(|o| o.report.virtual_secs).sum();
    let wall: f64 = outcomes.iter().map(|o| o.report.wall_secs).sum();
    println!(
        "{} cases, {failing} failing, {:.0} virtual s in {:.2} wall s",
        outcomes.len(),
        virtual_secs,
        wall
    );
    for path in &written {
        println!("wrote {}", path.display());
    }
    if failing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs `file` on `backend` `repeat` times and returns (virtual, wall) seconds.
fn measure(file: &std::path::Path, backend: Backend, repeat: u32) -> Result<(f64, f64), String> {
    let scenario = Scenario::from_file(file).map_err(|e| e.to_string())?;
    let mut virtual_secs = 0.0;
    let mut wall_secs = 0.0;
    for _ in 0..repeat {
        let report = run(
            &scenario,
            RunOptions {
                seed: None,
                backend: Some(backend),
                keep: Keep::Nothing,
            },
        )
        .map_err(|e| e.to_string())?;
        if !report.passed {
            return Err(format!("{} failed its checks", scenario.name));
        }
        virtual_secs += report.virtual_secs;
        wall_secs += report.wall_secs;
    }
    Ok((virtual_secs, wall_secs))
}

fn cmd_speed(dir: PathBuf) -> ExitCode {
    let small = dir.join("idle-trim-wake-both-sides.toml");
    let big = dir.join("fifty-node-churn-hour.toml");
    for (backend, repeat) in [(Backend::Event, 20), (Backend::Turmoil, 1)] {
        match measure(&small, backend, repeat) {
            Ok((v, w)) => println!(
                "2-node idle trim, {}: {v:.0} virtual s in {w:.3} wall s = {:.0}x real time",
                backend.as_str(),
                v / w
            ),
            Err(e) => println!("2-node idle trim, {}: not measured ({e})", backend.as_str()),
        }
    }
    match measure(&big, Backend::Event, 1) {
        Ok((v, w)) => {
            println!("50-node churn hour, event: {v:.0} virtual s in {w:.3} wall s");
            println!("event backend, 50-node hour: {:.0}x real time", v / w);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("event backend, 50-node hour: not measured ({e})");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            file,
            seed,
            backend,
            json,
        } => cmd_run(file, seed, backend, json),
        Command::Replay {
            file,
            seed,
            backend,
            svg,
            from,
            to,
        } => cmd_replay(file, seed, backend, svg, (from, to)),
        Command::Explore {
            cases,
            seed,
            corpus,
        } => cmd_explore(cases, seed, corpus),
        Command::Speed { dir } => cmd_speed(dir),
    }
}
