//! Replays every committed corpus input through its target's property checks, on stable and
//! without libFuzzer, and checks each target has its seeds. With `LATCH_FUZZ_WRITE_SEEDS=1` it
//! (re)writes the seeds into `corpus/<target>/seed-<name>` first.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn every_corpus_input_passes_its_checks() {
    let write = std::env::var_os("LATCH_FUZZ_WRITE_SEEDS").is_some_and(|v| v == "1");
    for target in latch_fuzz::TARGETS {
        let dir = corpus_dir(target);
        let seeds = latch_fuzz::seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
            }
        }
        let check = latch_fuzz::check_fn(target).unwrap();
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}; write the seeds first", dir.display()))
        {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| check(&bytes)).is_err() {
                panic!("{} fails its checks", path.display());
            }
            replayed += 1;
        }
        for (name, _) in &seeds {
            assert!(
                dir.join(format!("seed-{name}")).exists(),
                "{target}: seed {name} is not committed (LATCH_FUZZ_WRITE_SEEDS=1)"
            );
        }
        eprintln!("{target}: {replayed} inputs pass");
    }
}
