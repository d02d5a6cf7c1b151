//! Skipped tests, said where a person reads them: a test that lacks a tool or root calls
//! `skipped`, which prints the loud SKIPPED line (swallowed by libtest when the test passes)
//! and records the skip for this `cargo test` run; `report` (xtask's `zz_skipped_tests`
//! target, which cargo runs last in `cargo test --workspace`) prints every record of the run
//! at the end of the output. Here in xtask, which needs no Latch crate, so that the summary
//! target builds without them; tests call it as `latch_testkit::skip::skipped`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// `target/<profile>/latch-skipped/`, where the records of each run are.
fn records_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    Some(deps.parent()?.join("latch-skipped"))
}

/// The run this process belongs to: cargo, which starts every test binary of a `cargo test`,
/// is the parent; its PID and start time (field 22 of /proc/<pid>/stat) name the run.
fn run_id() -> Option<String> {
    let parent = std::os::unix::process::parent_id();
    let stat = std::fs::read_to_string(format!("/proc/{parent}/stat")).ok()?;
    let started = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{parent}-{started}"))
}

/// This test's name as libtest runs it: `<test binary>::<test>` (the thread's name, without
/// the binary's hash).
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem()?.to_str().map(str::to_string))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => stem,
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => format!("{binary}::{name}"),
        _ => binary,
    }
}

/// Reports that the running test skips: prints `*** SKIPPED ... ***` and records it for the
/// summary at the end of `cargo test --workspace`. `why` says what is missing and how to get
/// it or make the skip a failure.
pub fn skipped(why: &str) {
    let test = test_name();
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    if let (Some(dir), Some(run)) = (records_dir(), run_id()) {
        record(&dir, &run, &test, why);
    }
}

/// Appends one record (a line: test, tab, why) to run `run`'s file in `dir`.
fn record(dir: &Path, run: &str, test: &str, why: &str) {
    let line = format!("{test}\t{}\n", why.replace(['\n', '\t'], " "));
    let _ = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{run}.txt")))?
            .write_all(line.as_bytes())
    });
}

/// The skips recorded in `dir` for run `run` (test, why), in the order they happened;
/// removes that record file, and those of runs older than a day.
fn take_records(dir: &Path, run: &str) -> Vec<(String, String)> {
    let path = dir.join(format!("{run}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 86_400));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(test, why)| (test.to_string(), why.to_string()))
        .collect()
}

/// The summary `report` prints.
pub fn summary(records: &[(String, String)]) -> String {
    if records.is_empty() {
        return "latch: no test was skipped in this run.\n".to_string();
    }
    let mut text = format!(
        "\nlatch: {} test(s) SKIPPED in this run (counted as passed above):\n",
        records.len()
    );
    for (test, why) in records {
        text.push_str(&format!("  {test}: {why}\n"));
    }
    text.push_str(
        "Install what they need (README, \"Tests\") or set the LATCH_REQUIRE_* variable named to \
         make a skip fail.\n",
    );
    text
}

/// Prints the summary of this run's skips (xtask's `zz_skipped_tests` target).
pub fn report() {
    let records = match (records_dir(), run_id()) {
        (Some(dir), Some(run)) => take_records(&dir, &run),
        _ => Vec::new(),
    };
    print!("{}", summary(&records));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_of_a_run_are_summarized_once_with_their_reasons() {
        let dir = tempfile::tempdir().unwrap();
        record(
            dir.path(),
            "1-2",
            "netns::capture",
            "needs root; missing: root",
        );
        record(dir.path(), "9-9", "other::run", "another cargo test");
        record(
            dir.path(),
            "1-2",
            "kubernetes::manifests",
            "kubernetes-validate is not installed",
        );
        let records = take_records(dir.path(), "1-2");
        assert_eq!(
            records,
            [
                (
                    "netns::capture".to_string(),
                    "needs root; missing: root".to_string()
                ),
                (
                    "kubernetes::manifests".to_string(),
                    "kubernetes-validate is not installed".to_string()
                ),
            ]
        );
        let text = summary(&records);
        assert!(text.contains("2 test(s) SKIPPED in this run"), "{text}");
        assert!(
            text.contains("  netns::capture: needs root; missing: root\n"),
            "{text}"
        );
        assert!(take_records(dir.path(), "1-2").is_empty(), "said once");
        assert_eq!(take_records(dir.path(), "9-9").len(), 1, "other runs kept");
        assert_eq!(summary(&[]), "latch: no test was skipped in this run.\n");
    }

    #[test]
    fn a_test_is_named_after_its_binary_and_thread() {
        assert_eq!(
            test_name(),
            "xtask::skipped::tests::a_test_is_named_after_its_binary_and_thread"
        );
    }
}
