//! `ddpm`: train denoising diffusion models on real images and sample from them.
//!
//! A thin layer over the crates: it parses flags, wires the pieces and reports. Every error is
//! one clear line and a non-zero exit.

// The flags' doc comments are their `--help` text, written for a terminal: `<dataset>` and
// `[:SPLIT]` there are placeholders, not HTML or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod env;
mod eval;
mod export;
mod forward;
mod launch;
mod net_env;
mod output;
mod pretrained;
mod sample;
mod schedule;
mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

// candle allocates a fresh buffer for every op: mimalloc reuses memory instead of faulting in
// new pages each time (much faster training steps; docs/benchmarks.md); `main` also keeps it
// from handing freed pages back to the OS (`keep_freed_host_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train denoising diffusion probabilistic models (DDPM) and generate images with them.
#[derive(Parser)]
#[command(name = "ddpm", version, about)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing-subscriber directive).
    #[arg(long, global = true, default_value = "info", env = "DDPM_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (with no arguments: the MNIST preset on data/mnist).
    Train(Box<train::TrainArgs>),
    /// Generate images from a trained model.
    Sample(sample::SampleArgs),
    /// Measure a trained model: bits/dim on a data split and sample quality.
    Eval(Box<eval::EvalArgs>),
    /// Draw the forward (noising) process on real images.
    Forward(forward::ForwardArgs),
    /// Print a noise schedule and every derived buffer.
    Schedule(schedule::ScheduleArgs),
    /// Write a trained model in another format: a diffusers DDPMPipeline directory.
    Export(export::ExportArgs),
    /// Train data-parallel: start N ranks of `ddpm train` on this machine, one per GPU.
    Launch(launch::LaunchArgs),
}

fn main() -> ExitCode {
    env::park_idle_candle_threads();
    env::no_backtraces_in_errors();
    if !env::mimalloc_purge_delay_set() {
        ddpm_train::device::keep_freed_host_memory();
    }
    // Every option that takes a value accepts a negative number (`--lr -1`, then refused by the
    // value's own check) rather than reading it as an unknown flag.
    let command = Cli::command().mut_subcommands(|sub| {
        sub.mut_args(|arg| {
            if arg.get_action().takes_values() {
                arg.allow_negative_numbers(true)
            } else {
                arg
            }
        })
    });
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // The subcommand the arguments name, for errors whose text has no usage line.
            let names: Vec<String> = Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            let sub = std::env::args().skip(1).find(|a| names.contains(a));
            eprintln!(
                "{}",
                usage_error_line(&e.render().to_string(), sub.as_deref())
            );
            return ExitCode::from(2);
        }
        // --help and --version.
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // Named as the user gave it: the variable when the flag is absent.
    let log_source =
        if std::env::args_os().any(|a| a == "--log" || a.to_string_lossy().starts_with("--log=")) {
            "--log"
        } else {
            "DDPM_LOG"
        };
    let filter = match log_filter(&cli.log, log_source) {
        Ok(f) => f,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(2);
        }
    };
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::Layer as _;
        // The HTTP client's trace level dumps every request's bytes, a token's header among
        // them: never shown, whatever the filter says.
        let no_wire_dump = tracing_subscriber::filter::filter_fn(|meta| {
            !(meta.target().starts_with("ureq") && *meta.level() == tracing::Level::TRACE)
        });
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_filter(filter)
                    .with_filter(no_wire_dump),
            )
            .init();
    }
    // The kernel policy of the environment (commands that read a run's config install its
    // policy, with the environment's variables applied, once they have it).
    if let Err(e) = env::install_kernel_policy(ddpm_unet::KernelPolicy::default()) {
        print_error(&e);
        return ExitCode::FAILURE;
    }
    match env::cuda_pool_release() {
        Ok(release) => ddpm_train::device::set_cuda_pool_release(release),
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    }
    // The Hub options of the environment (HF_ENDPOINT, HF_HOME, ...), for `hf:` data sets
    // wherever one is opened (`train`, `eval`).
    match env::hub_options() {
        Ok(options) => ddpm_data::hub::install(options),
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command.unwrap_or(Command::Train(Box::default())) {
        Command::Train(a) => train::run(*a),
        Command::Sample(a) => sample::run(a),
        Command::Eval(a) => eval::run(*a),
        Command::Forward(a) => forward::run(a),
        Command::Schedule(a) => schedule::run(a),
        Command::Launch(a) => launch::run(a),
        Command::Export(a) => export::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<launch::SoleRankFailed>() => {
            let code = e
                .downcast_ref::<launch::SoleRankFailed>()
                .map_or(1, |f| f.code);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// clap's usage error (`error: ...`, indented details, tips, `Usage: ddpm CMD ...`, a footer)
/// as one line: the message with its details and tips, then where to read more.
fn usage_error_line(text: &str, subcommand: Option<&str>) -> String {
    let mut paragraphs = text.split("\n\n").map(|p| {
        p.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
    });
    let mut line = paragraphs
        .next()
        .map(|p| p.join(" "))
        .unwrap_or_else(|| "error: bad arguments".to_string());
    let mut command = subcommand.map_or("ddpm".to_string(), |s| format!("ddpm {s}"));
    for p in paragraphs {
        for l in p {
            if let Some(tip) = l.strip_prefix("tip:") {
                line.push_str(&format!(" ({})", tip.trim()));
            } else if let Some(usage) = l.strip_prefix("Usage:") {
                command = usage
                    .split_whitespace()
                    .take_while(|w| !w.starts_with(['[', '<', '-']))
                    .collect::<Vec<_>>()
                    .join(" ");
            }
        }
    }
    format!("{line}; see `{command} --help`")
}

/// The log filter of `--log` (or `DDPM_LOG`, named by `source` in errors): a level, or
/// tracing-subscriber directives. What would silently hide every line is refused: an empty
/// filter, a bare word that is neither a level nor one of our crates or candle's (it reads as a
/// module name), a target with a glob (there are none), a span filter without a target.
fn log_filter(text: &str, source: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    const TARGETS: [&str; 12] = [
        "ureq",
        "ureq_proto",
        "rustls",
        "ddpm",
        "ddpm_cli",
        "ddpm_data",
        "ddpm_train",
        "ddpm_unet",
        "ddpm_kernels",
        "ddpm_schedule",
        "candle_core",
        "candle_nn",
    ];
    let advice = "use error, warn, info, debug, trace or off, or directives such as \
                  info,ddpm_train=debug";
    let named = if source.starts_with("--") {
        format!("{source} {text}")
    } else {
        format!("{source}={text}")
    };
    let bad = |why: String| anyhow::anyhow!("{named}: {why}: {advice}");
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(bad("an empty filter hides every line".into()));
    }
    for directive in directives {
        let (target, level) = match directive.rsplit_once('=') {
            Some((t, l)) => (t, Some(l)),
            None => (directive, None),
        };
        let is_level = |w: &str| LEVELS.contains(&w.to_ascii_lowercase().as_str());
        if level.is_some_and(|l| !is_level(l)) {
            return Err(bad(format!("`{directive}` does not end in a level")));
        }
        let module = target.split('[').next().unwrap_or_default();
        let crate_name = module.split("::").next().unwrap_or_default();
        if level.is_none() && is_level(target) {
            continue;
        }
        if module.is_empty() || module.contains('*') || !TARGETS.contains(&crate_name) {
            return Err(bad(format!(
                "`{directive}` names no module of this program (a target it does not know, or a \
                 glob, would hide every other line)"
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| bad(format!("not a log filter ({e})")))
}

/// Writes `error: MESSAGE` for `e` ([`chain`]) to standard error in one write, so that the line
/// of another process sharing the stream (a launcher and its ranks) cannot land inside it.
fn print_error(e: &anyhow::Error) {
    use std::io::Write;
    let line = format!("error: {}\n", chain(e));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The error and its causes on one line: "reading X: file is truncated". Control characters (a
/// file name's newline, a terminal escape) are written escaped, as `\n` or `\u{1b}`, so that no
/// name can break the line or forge another.
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    one_line(&parts.join(": "))
}

/// `text` with every control character escaped (`\n`, `\t`, `\u{1b}`, ...).
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Refuses an output path whose extension is not `ext`: the bytes written must be what the
/// name says (`flag` names the option in the error).
pub(crate) fn require_extension(
    path: &std::path::Path,
    flag: &str,
    ext: &str,
) -> anyhow::Result<()> {
    let found = path.extension().and_then(|e| e.to_str());
    if found.is_some_and(|e| e.eq_ignore_ascii_case(ext)) {
        return Ok(());
    }
    anyhow::bail!(
        "{flag} {}: this writes a {} file, so name it .{ext} (it has {})",
        path.display(),
        ext.to_ascii_uppercase(),
        found.map_or("no extension".to_string(), |e| format!("`.{e}`"))
    )
}

/// Refuses, before any work, an output file that could not be written at the end
/// ([`ddpm_fs::check_output`]): a missing directory, a directory or FIFO at the path, a read-only
/// file (`flag` names the option in the error).
pub(crate) fn check_output_file(path: &std::path::Path, flag: &str) -> anyhow::Result<()> {
    ddpm_fs::check_output(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// Refuses, before any work, two outputs of one command that are one file (the same name twice,
/// a symbolic link to the other, another spelling of its path): the one written last would
/// silently replace the other. Each output is `(what, path)`, `what` naming it in the error
/// (a flag such as `--gif`); paths whose directory cannot be resolved were refused by
/// [`check_output_file`] already.
pub(crate) fn check_distinct_outputs(outputs: &[(&str, &std::path::Path)]) -> anyhow::Result<()> {
    let ids: Vec<_> = outputs
        .iter()
        .map(|(_, p)| ddpm_fs::output_identity(p).ok())
        .collect();
    for (i, a) in ids.iter().enumerate() {
        for (j, b) in ids.iter().enumerate().skip(i + 1) {
            if let (Some(a), Some(b)) = (a, b) {
                if a == b {
                    let ((fa, pa), (fb, pb)) = (outputs[i], outputs[j]);
                    anyhow::bail!(
                        "{fa} {} and {fb} {} are the same file ({}): one would replace the other, \
                         so name them differently (nothing was written)",
                        pa.display(),
                        pb.display(),
                        a.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The beta schedule named `word` ([`ddpm_schedule::BetaSchedule::NAMES`]) with its default
/// parameters, or an error listing the names.
pub(crate) fn beta_schedule(word: &str) -> anyhow::Result<ddpm_schedule::BetaSchedule> {
    ddpm_schedule::BetaSchedule::from_name(word).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown schedule `{word}`: choose one of {}",
            ddpm_schedule::BetaSchedule::NAMES.join(", ")
        )
    })
}

/// Parses a serde enum from a command-line word, e.g. `eps` or `{kind = "cosine"}`-style tags.
pub(crate) fn parse_word<T: serde::de::DeserializeOwned>(
    word: &str,
    what: &str,
    choices: &str,
) -> anyhow::Result<T> {
    let w = word.trim().to_ascii_lowercase().replace('-', "_");
    serde_json::from_value(serde_json::Value::String(w.clone()))
        .or_else(|_| serde_json::from_value(serde_json::json!({ "kind": w })))
        .map_err(|_| anyhow::anyhow!("unknown {what} `{word}`: choose one of {choices}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_one_line_with_details_tips_and_the_command() {
        let conflict = "error: the argument '--resume <RESUME>' cannot be used with '--model \
                        <MODEL>'\n\nUsage: ddpm train --resume <RESUME>\n\nFor more information, \
                        try '--help'.\n";
        assert_eq!(
            usage_error_line(conflict, Some("train")),
            "error: the argument '--resume <RESUME>' cannot be used with '--model <MODEL>'; see \
             `ddpm train --help`"
        );
        let missing = "error: the following required arguments were not provided:\n  --nproc \
                       <N>\n  <COMMAND>...\n\nUsage: ddpm launch --nproc <N> <COMMAND>...\n\nFor \
                       more information, try '--help'.\n";
        assert_eq!(
            usage_error_line(missing, Some("launch")),
            "error: the following required arguments were not provided: --nproc <N> \
             <COMMAND>...; see `ddpm launch --help`"
        );
        // A value error has no usage line: the subcommand of the arguments is named.
        let value = "error: invalid value 'abc' for '--num <NUM>': invalid digit found in \
                     string\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_line(value, Some("sample")),
            "error: invalid value 'abc' for '--num <NUM>': invalid digit found in string; see \
             `ddpm sample --help`"
        );
        let tip = "error: unexpected argument '--stpes' found\n\n  tip: a similar argument \
                   exists: '--steps'\n\nUsage: ddpm sample [OPTIONS]\n\nFor more information, \
                   try '--help'.\n";
        assert_eq!(
            usage_error_line(tip, Some("sample")),
            "error: unexpected argument '--stpes' found (a similar argument exists: '--steps'); \
             see `ddpm sample --help`"
        );
    }

    #[test]
    fn an_error_naming_a_file_with_a_newline_stays_one_line() {
        let e = anyhow::anyhow!("cannot decode image")
            .context("/data/bad\nerror: forged.png\u{1b}[2J\tx");
        assert_eq!(
            chain(&e),
            "/data/bad\\nerror: forged.png\\u{1b}[2J\\tx: cannot decode image"
        );
        assert_eq!(one_line("été ok"), "été ok");
    }

    #[test]
    fn log_filters_are_levels_or_directives() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,ddpm_train=debug",
            "ddpm_train",
            "candle_core",
            "warn,ddpm_train::trainer=trace",
            "info,ddpm_train[span]=debug",
            "ureq=trace,warn",
        ] {
            assert!(log_filter(good, "--log").is_ok(), "{good}");
        }
        for bad in [
            "errr",
            "infoo",
            "nonsense=[",
            "info,verbose",
            "",
            ",",
            "ddpm_*",
            "ddpm*",
            "candle*",
            "[span]",
            "[]",
            "ddpm_train=",
        ] {
            let e = log_filter(bad, "DDPM_LOG").err().map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(e.starts_with(&format!("DDPM_LOG={bad}:")), "{bad:?}: {e}");
        }
    }
}
