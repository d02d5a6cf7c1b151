//! `cargo xtask fuzz`: builds the cargo-fuzz crate in `fuzz/` and runs each target for a bounded
//! time on the committed corpus (`fuzz/corpus/<target>`); fails if any target crashed, saying
//! where each crashing input was written. New inputs found go to a scratch corpus under the fuzz
//! target dir, never into the repo unless `--merge` asks for it. Used by CI (`.ci/run`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Seconds per target when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 60;

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzArgs {
    pub seconds: u64,
    /// Fold the run's new, coverage-adding inputs into the committed corpus afterwards.
    pub merge: bool,
    /// (Re)write each target's hand-made seeds into the committed corpus before running.
    pub write_seeds: bool,
    /// Targets to run; all of `fuzz/fuzz_targets/` when empty.
    pub targets: Vec<String>,
}

impl FuzzArgs {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut parsed = Self {
            seconds: DEFAULT_SECONDS,
            merge: false,
            write_seeds: false,
            targets: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    let value = args.next().context("--seconds needs a number")?;
                    parsed.seconds =
                        value.parse().ok().filter(|s| *s > 0).with_context(|| {
                            format!("--seconds {value:?}: not a positive number")
                        })?;
                }
                "--merge" => parsed.merge = true,
                "--write-seeds" => parsed.write_seeds = true,
                flag if flag.starts_with('-') => bail!("unknown flag {flag}"),
                target => parsed.targets.push(target.to_string()),
            }
        }
        Ok(parsed)
    }
}

/// One target's run.
#[derive(Debug, Clone)]
pub struct TargetRun {
    pub target: String,
    pub executions: Option<u64>,
    pub seconds: f64,
    /// Inputs in the committed corpus and in the scratch corpus after the run.
    pub committed: usize,
    pub scratch: usize,
}

/// The targets, from the file names in `fuzz/fuzz_targets/`.
pub fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz").join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Where the fuzz crate builds (`LATCH_FUZZ_TARGET_DIR`, else `<target dir>/fuzz`): apart from
/// the workspace's, since cargo-fuzz compiles everything with coverage instrumentation.
pub fn fuzz_target_dir(root: &Path) -> PathBuf {
    std::env::var_os("LATCH_FUZZ_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::compose::target_dir(root).join("fuzz"))
}

/// libFuzzer's `stat::number_of_executed_units` from its output (`-print_final_stats=1`).
pub fn executed_units(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// The files libFuzzer wrote a failing input to ("Test unit written to <path>").
pub fn failing_inputs(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| path.trim().to_string())
        .collect()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// `cargo fuzz <args>` in the repo root with the fuzz target dir.
fn cargo_fuzz(root: &Path, cargo: &Path, target_dir: &Path) -> Command {
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir)
        .arg("fuzz");
    command
}

/// Flags of every build and run: no sanitizer (works on stable), debug assertions and overflow
/// checks on, so that arithmetic overflow in the code under test is a crash.
const BUILD_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];

pub fn run(root: &Path, cargo: &Path, args: &FuzzArgs) -> Result<Vec<TargetRun>> {
    let all = targets(root)?;
    let chosen = if args.targets.is_empty() {
        all.clone()
    } else {
        args.targets.clone()
    };
    if let Some(unknown) = chosen.iter().find(|t| !all.contains(t)) {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            all.join(", ")
        );
    }
    let version = Command::new(cargo)
        .args(["fuzz", "--version"])
        .output()
        .context("running cargo fuzz --version")?;
    if !version.status.success() {
        bail!("cargo-fuzz is not installed: cargo install cargo-fuzz --locked");
    }
    let target_dir = fuzz_target_dir(root);
    eprintln!(
        "building the fuzz targets in {} (stable, no sanitizer)",
        target_dir.display()
    );
    let started = Instant::now();
    let status = cargo_fuzz(root, cargo, &target_dir)
        .arg("build")
        .args(BUILD_FLAGS)
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed");
    }
    eprintln!("built in {:.0} s", started.elapsed().as_secs_f64());

    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for target in &chosen {
        let committed = root.join("fuzz").join("corpus").join(target);
        let scratch = target_dir.join("corpus").join(target);
        let logs = target_dir.join("logs");
        for dir in [&committed, &scratch, &logs] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log_path = logs.join(format!("{target}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        eprintln!("fuzzing {target} for {} s", args.seconds);
        let started = Instant::now();
        // libFuzzer writes new inputs into the first corpus dir only: the scratch one.
        let mut command = cargo_fuzz(root, cargo, &target_dir);
        if args.write_seeds {
            // Each target's init writes its seeds (latch_fuzz::write_seeds_if_asked).
            command.env("LATCH_FUZZ_WRITE_SEEDS", root.join("fuzz").join("corpus"));
        }
        let status = command
            .arg("run")
            .args(BUILD_FLAGS)
            .arg(target)
            .arg(&scratch)
            .arg(&committed)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running cargo fuzz run")?;
        let seconds = started.elapsed().as_secs_f64();
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
            let inputs = failing_inputs(&output);
            let failure = match inputs.first() {
                None => format!(
                    "{target} failed without writing an input; full log: {}",
                    log_path.display()
                ),
                Some(input) => format!(
                    "{target} found a failing input: {}\n  reproduce: cargo fuzz run \
                     --sanitizer none --debug-assertions {target} {input}\n  full log: {}",
                    inputs.join(", "),
                    log_path.display()
                ),
            };
            eprintln!("{failure}");
            failures.push(failure);
            continue;
        }
        let run = TargetRun {
            target: target.clone(),
            executions: executed_units(&output),
            seconds,
            committed: count_files(&committed),
            scratch: count_files(&scratch),
        };
        eprintln!(
            "{target}: {} executions in {seconds:.0} s, no failure",
            run.executions
                .map_or_else(|| "?".to_string(), |n| n.to_string())
        );
        if args.merge {
            let status = cargo_fuzz(root, cargo, &target_dir)
                .arg("run")
                .args(BUILD_FLAGS)
                .arg(target)
                .arg(&committed)
                .arg(&scratch)
                // Edges only (no hit counts): keeps the committed corpus to a few hundred KB.
                .args(["--", "-merge=1", "-use_counters=0", "-use_value_profile=0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running cargo fuzz run -merge=1")?;
            if !status.success() {
                bail!("merging the new inputs of {target} failed");
            }
            eprintln!(
                "{target}: committed corpus now {} inputs",
                count_files(&committed)
            );
        }
        runs.push(run);
    }
    if !failures.is_empty() {
        eprint!("{}", summary(&runs));
        bail!("fuzzing failed:\n{}", failures.join("\n"));
    }
    Ok(runs)
}

/// The summary table printed at the end.
pub fn summary(runs: &[TargetRun]) -> String {
    let mut out =
        String::from("target               executions   seconds  corpus (committed + new)\n");
    for r in runs {
        out.push_str(&format!(
            "{:<20} {:>10} {:>9.0}  {} + {}\n",
            r.target,
            r.executions
                .map_or_else(|| "?".to_string(), |n| n.to_string()),
            r.seconds,
            r.committed,
            r.scratch
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            FuzzArgs::parse(&[]).unwrap(),
            FuzzArgs {
                seconds: 60,
                merge: false,
                write_seeds: false,
                targets: vec![]
            }
        );
        assert_eq!(
            FuzzArgs::parse(&args(&[
                "--seconds",
                "5",
                "csr",
                "--merge",
                "--write-seeds",
                "spiffe_id"
            ]))
            .unwrap(),
            FuzzArgs {
                seconds: 5,
                merge: true,
                write_seeds: true,
                targets: args(&["csr", "spiffe_id"])
            }
        );
        for bad in [
            &["--seconds"][..],
            &["--seconds", "0"],
            &["--seconds", "x"],
            &["-v"],
        ] {
            assert!(FuzzArgs::parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_libfuzzer_output() {
        let log = "#2\tINITED cov: 10\n\
                   ==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='fuzz/artifacts/csr/'; Test unit written to fuzz/artifacts/csr/crash-abc\n\
                   stat::number_of_executed_units: 123456\n\
                   stat::average_exec_per_sec:     2057\n";
        assert_eq!(executed_units(log), Some(123456));
        assert_eq!(failing_inputs(log), vec!["fuzz/artifacts/csr/crash-abc"]);
        assert_eq!(executed_units("nothing"), None);
    }

    #[test]
    fn targets_are_the_files_of_fuzz_targets() {
        let root = crate::codegen::workspace_root();
        let names = targets(&root).unwrap();
        for target in &names {
            assert!(
                root.join("fuzz/corpus").join(target).is_dir(),
                "fuzz target {target} has no committed corpus"
            );
        }
        assert!(names.contains(&"spiffe_id".to_string()), "{names:?}");
    }
}
