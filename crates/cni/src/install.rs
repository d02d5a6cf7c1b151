//! Node set-up, run by the DaemonSet (deploy/kubernetes/50-cni.yaml): copies this binary into
//! the node's CNI bin folder and appends latch-cni's entry to the plugins of the node's CNI
//! configuration (the file the runtime uses: the first by name), so it runs after the
//! cluster's network plugin. `--watch` repeats that, because a network plugin's own installer
//! may rewrite its configuration and drop the entry. `uninstall` reverses both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The plugin's type: the name of its binary in the CNI bin folder.
pub const PLUGIN_TYPE: &str = "latch-cni";

/// Where to install.
#[derive(Debug, Clone)]
pub struct Target {
    /// The node's CNI bin folder (/opt/cni/bin on most nodes), as mounted.
    pub bin_dir: PathBuf,
    /// The node's CNI configuration folder (/etc/cni/net.d), as mounted.
    pub conf_dir: PathBuf,
    /// latch-cni's entry (a JSON object: captureNamespaces, ...); `type` is set here.
    pub entry: Value,
}

/// What one pass changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    pub config: Option<PathBuf>,
}

/// Reads the entry file (JSON object).
pub fn read_entry(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut entry: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(fields) = entry.as_object_mut() else {
        bail!(
            "{} must hold a JSON object (latch-cni's entry)",
            path.display()
        );
    };
    fields.insert("type".into(), PLUGIN_TYPE.into());
    Ok(entry)
}

/// Installs the binary, then the configuration entry (in that order: a runtime that sees the
/// entry must find the binary).
pub fn install_once(target: &Target, binary: &Path) -> Result<Changes> {
    let mut changes = Changes {
        binary: install_binary(binary, &target.bin_dir)?,
        config: None,
    };
    let Some(path) = primary_config(&target.conf_dir)? else {
        bail!(
            "no CNI configuration in {} yet (the cluster's network plugin writes one); \
             latch-cni is chained after it",
            target.conf_dir.display()
        );
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let conf: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let chained = chain(conf.clone(), &target.entry)
        .with_context(|| format!("adding latch-cni to {}", path.display()))?;
    // A single-plugin .conf becomes a .conflist of the same name; the .conf goes, or it would
    // still be the first file and the runtime would keep using it.
    let out = if conf.get("plugins").is_some() {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    if out != path || chained != conf {
        write_atomic(
            &out,
            serde_json::to_string_pretty(&chained)?.as_bytes(),
            0o644,
        )?;
        if out != path {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing {} (now {})", path.display(), out.display()))?;
        }
        changes.config = Some(out);
    }
    Ok(changes)
}

/// Takes latch-cni out of the node's configuration and removes the binary.
pub fn uninstall(target: &Target) -> Result<()> {
    if let Some(path) = primary_config(&target.conf_dir)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let conf: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let unchained = unchain(conf.clone());
        if unchained != conf {
            write_atomic(
                &path,
                serde_json::to_string_pretty(&unchained)?.as_bytes(),
                0o644,
            )?;
        }
    }
    match std::fs::remove_file(target.bin_dir.join(PLUGIN_TYPE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).context("removing the latch-cni binary")
        }
        _ => Ok(()),
    }
}

/// Repeats `install_once` every `every`, reading the entry from `entry_file` each time (a
/// ConfigMap edit reaches the node without a restart), until SIGTERM or SIGINT. Failures are
/// logged and retried: the network plugin may not have written its configuration yet.
pub async fn watch(
    dirs: (PathBuf, PathBuf),
    entry_file: &Path,
    binary: &Path,
    every: Duration,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    loop {
        let pass = read_entry(entry_file).and_then(|entry| {
            let target = Target {
                bin_dir: dirs.0.clone(),
                conf_dir: dirs.1.clone(),
                entry,
            };
            install_once(&target, binary)
        });
        match pass {
            Ok(changes) => report(&changes),
            Err(e) => eprintln!("latch-cni install: {e:#}; retrying in {every:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

/// Logs what a pass changed (nothing when all was in place).
pub fn report(changes: &Changes) {
    if changes.binary {
        eprintln!("latch-cni install: binary installed");
    }
    if let Some(path) = &changes.config {
        eprintln!("latch-cni install: chained into {}", path.display());
    }
}

/// The configuration the runtime uses: the first `.conf`, `.conflist` or `.json` file by name
/// (libcni's order).
fn primary_config(dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `conf` (a conflist, or a single plugin's conf) with latch-cni's `entry` as its last plugin,
/// replacing any earlier latch-cni entry.
pub fn chain(conf: Value, entry: &Value) -> Result<Value> {
    let mut list = match conf {
        Value::Object(fields) if fields.contains_key("plugins") => Value::Object(fields),
        Value::Object(mut plugin) => {
            // A single plugin: the list takes its version and name.
            let mut list = serde_json::Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(value) = plugin.get(key) {
                    list.insert(key.into(), value.clone());
                }
            }
            plugin.remove("name");
            list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
            Value::Object(list)
        }
        _ => bail!("not a JSON object"),
    };
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        bail!("\"plugins\" is not a list");
    };
    plugins.retain(|p| !is_latch(p));
    if plugins.is_empty() {
        bail!("no network plugin to chain after");
    }
    plugins.push(entry.clone());
    Ok(list)
}

/// `conf` without latch-cni entries.
pub fn unchain(mut conf: Value) -> Value {
    if let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| !is_latch(p));
    }
    conf
}

fn is_latch(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Copies `binary` to `<dir>/latch-cni` when it differs, through a temp file and a rename, so
/// a runtime never executes a half-written plugin. Returns whether it copied.
fn install_binary(binary: &Path, dir: &Path) -> Result<bool> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let dest = dir.join(PLUGIN_TYPE);
    if std::fs::read(&dest).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    write_atomic(&dest, &bytes, 0o755)?;
    Ok(true)
}

fn write_atomic(dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dest.with_file_name(format!(".{name}.latch-tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, dest)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        anyhow::anyhow!("writing {}: {e}", dest.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({"type": "latch-cni", "captureNamespaces": ["shop"]})
    }

    #[test]
    fn chaining_appends_once_and_unchaining_removes() {
        let conflist = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network",
            "plugins": [{"type": "calico"}, {"type": "portmap"}, {"type": "latch-cni", "old": true}],
        });
        let chained = chain(conflist, &entry()).unwrap();
        assert_eq!(
            chained["plugins"],
            json!([{"type": "calico"}, {"type": "portmap"}, entry()])
        );
        assert_eq!(chain(chained.clone(), &entry()).unwrap(), chained);
        assert_eq!(
            unchain(chained)["plugins"],
            json!([{"type": "calico"}, {"type": "portmap"}])
        );
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"});
        assert_eq!(
            chain(conf, &entry()).unwrap(),
            json!({"cniVersion": "0.4.0", "name": "bridge-net", "plugins": [
                {"cniVersion": "0.4.0", "type": "bridge", "bridge": "cni0"}, entry()]})
        );
        assert!(chain(json!({"plugins": []}), &entry()).is_err());
        assert!(chain(json!([1]), &entry()).is_err());
    }

    #[test]
    fn install_writes_the_binary_and_chains_into_the_first_config() {
        let dir = tempfile::tempdir().unwrap();
        let (bin_dir, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(&conf_dir).unwrap();
        let binary = dir.path().join("built");
        std::fs::write(&binary, b"#!plugin").unwrap();
        let target = Target {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            entry: entry(),
        };
        assert!(install_once(&target, &binary).is_err(), "no config yet");
        std::fs::write(
            conf_dir.join("10-bridge.conf"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(conf_dir.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let changes = install_once(&target, &binary).unwrap();
        let list = conf_dir.join("10-bridge.conflist");
        assert_eq!(
            changes,
            Changes {
                binary: false,
                config: Some(list.clone())
            }
        );
        assert!(!conf_dir.join("10-bridge.conf").exists());
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(written["plugins"][1], entry());
        assert_eq!(
            std::fs::read(bin_dir.join("latch-cni")).unwrap(),
            b"#!plugin"
        );
        assert_eq!(install_once(&target, &binary).unwrap(), Changes::default());
        uninstall(&target).unwrap();
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(written["plugins"].as_array().unwrap().len(), 1);
        assert!(!bin_dir.join("latch-cni").exists());
    }
}
