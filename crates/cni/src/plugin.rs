//! The CNI commands: ADD installs the capture rules in the pod's network namespace and passes
//! the previous plugin's result through, DEL removes them (and succeeds when there is nothing
//! to remove), CHECK fails when they are missing, VERSION/STATUS/GC answer what the
//! specification asks. Called by `main.rs` with the environment and stdin; returns what goes
//! to stdout.

use latch_proxy::capture::{self, Family, Installed};
use serde_json::Value;

use crate::config::{Decision, PluginConfig};
use crate::netns::{self, NetnsError};
use crate::spec::{CniError, Command, Env, NetConf, code, version_info};

/// Runs `command`; `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(command: Command, env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == Command::Version {
        return Ok(Some(version_info(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    let version = conf.cni_version.clone();
    let result = match command {
        Command::Add => add(env, &conf).map(Some),
        Command::Del => del(env).map(|()| None),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Version => Ok(Some(version_info(stdin))),
    };
    result.map_err(|e| e.in_version(&version))
}

/// Installs the rules (replacing earlier ones, so a repeated ADD is harmless) and returns the
/// previous result unchanged: latch-cni adds no interface or address.
fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    env.require_container_id()?;
    let config = PluginConfig::from_conf(&conf.rest)?;
    let Some(prev_result) = conf.prev_result.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "latch-cni is a chained plugin and got no prevResult",
            "list it after the cluster's network plugin in the plugins of a .conflist, never \
             alone or first",
        ));
    };
    let mut result = prev_result;
    if let Value::Object(fields) = &mut result {
        fields.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    let rules = match config.decide(env)? {
        Decision::Skip(reason) => {
            log(&format!("ADD {}: not captured: {reason}", env.pod_label()));
            return Ok(result);
        }
        Decision::Capture(rules) => rules,
    };
    enter_pod_netns(env, "ADD")?;
    match rules.install() {
        Ok(Installed::BothFamilies) => {}
        Ok(Installed::Ipv4Only(cause)) => log(&format!(
            "ADD {}: IPv4 capture rules only; the pod has no global IPv6 address and the \
             IPv6 rules could not be installed: {cause}",
            env.pod_label()
        )),
        Err(e) => {
            // `install` leaves no Latch rule behind on an error; make sure of it even when the
            // error came from its own clean-up, so a failed ADD never leaves half a rule set.
            let cleanup = match capture::uninstall() {
                Ok(()) => String::new(),
                Err(again) => format!("; removing the partial rules failed too: {again}"),
            };
            return Err(CniError::new(
                code::CAPTURE_FAILED,
                format!(
                    "cannot install Latch's capture rules for {}",
                    env.pod_label()
                ),
                format!("{e}{cleanup}"),
            ));
        }
    }
    Ok(result)
}

/// Removes every Latch rule. Succeeds when there is nothing to remove: no namespace given, the
/// namespace already gone, or no rules (after a failed ADD, or for a pod never captured).
fn del(env: &Env) -> Result<(), CniError> {
    env.require_container_id()?;
    let Some(path) = &env.netns else {
        return Ok(());
    };
    match netns::enter(path) {
        Ok(()) => {}
        Err(NetnsError::Gone { .. }) => return Ok(()),
        Err(e @ NetnsError::Failed { .. }) => {
            return Err(CniError::new(
                code::IO_FAILURE,
                format!(
                    "DEL {}: cannot enter its network namespace",
                    env.pod_label()
                ),
                e.to_string(),
            ));
        }
    }
    match capture::uninstall() {
        // Without iptables on the node no ADD could have installed a rule: nothing to remove,
        // and failing would keep the pod from ever being deleted.
        Err(capture::CaptureError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            log(&format!(
                "DEL {}: iptables is not installed, so no rule can be there",
                env.pod_label()
            ));
            Ok(())
        }
        other => other.map_err(|e| {
            CniError::new(
                code::CAPTURE_FAILED,
                format!("cannot remove Latch's capture rules of {}", env.pod_label()),
                e.to_string(),
            )
        }),
    }
}

/// Verifies that a captured pod still has every rule of each family it needs: IPv4 always,
/// IPv6 when the pod has a global IPv6 address (as ADD requires).
fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if !conf.version_has(Command::Check) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
            format!("the configuration has cniVersion {}", conf.cni_version),
        ));
    }
    env.require_container_id()?;
    let config = PluginConfig::from_conf(&conf.rest)?;
    let Decision::Capture(rules) = config.decide(env)? else {
        return Ok(());
    };
    enter_pod_netns(env, "CHECK")?;
    let mut families = vec![Family::V4];
    if !capture::global_ipv6_addresses().is_empty() {
        families.push(Family::V6);
    }
    let mut missing = Vec::new();
    for family in families {
        let absent = rules.missing(family).map_err(|e| capture_failed(env, e))?;
        let name = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        missing.extend(absent.into_iter().map(|rule| format!("{name}: {rule}")));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        code::CAPTURE_MISSING,
        format!(
            "Latch's capture rules are missing in {}: its traffic may bypass the proxy",
            env.pod_label()
        ),
        format!(
            "not installed: {}. Something removed or changed them after ADD; delete the pod \
             so that it is created again with the rules",
            missing.join("; ")
        ),
    ))
}

fn capture_failed(env: &Env, e: capture::CaptureError) -> CniError {
    CniError::new(
        code::CAPTURE_FAILED,
        format!("cannot read Latch's capture rules of {}", env.pod_label()),
        e.to_string(),
    )
}

/// Ready when the node has the tools ADD runs: iptables-restore (IPv4 is always required).
fn status(conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, Command::Status)?;
    let probe = std::process::Command::new("iptables-restore")
        .arg("--version")
        .output();
    match probe {
        Ok(out) if out.status.success() => Ok(()),
        other => Err(CniError::new(
            code::NOT_AVAILABLE,
            "latch-cni cannot install capture rules on this node",
            format!(
                "iptables-restore --version: {}; install iptables on the node (it must be on \
                 the container runtime's PATH)",
                match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                }
            ),
        )),
    }
}

/// Nothing to collect: the rules live in the pod's network namespace and go with it.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, Command::Gc)
}

fn require_version(conf: &NetConf, command: Command) -> Result<(), CniError> {
    if conf.version_has(command) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("{command:?} needs cniVersion 1.1.0"),
        format!("the configuration has cniVersion {}", conf.cni_version),
    ))
}

/// Enters CNI_NETNS for ADD or CHECK, which need it.
fn enter_pod_netns(env: &Env, command: &str) -> Result<(), CniError> {
    let Some(path) = &env.netns else {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_NETNS is not set for {command}"),
            "the runtime must give the path of the pod's network namespace",
        ));
    };
    netns::enter(path).map_err(|e| {
        let code = match e {
            NetnsError::Gone { .. } => 3,
            NetnsError::Failed { .. } => code::IO_FAILURE,
        };
        CniError::new(
            code,
            format!(
                "{command} {}: cannot enter its network namespace",
                env.pod_label()
            ),
            e.to_string(),
        )
    })
}

/// A line for the runtime's log (stderr is not part of the protocol).
fn log(message: &str) {
    eprintln!("latch-cni: {message}");
}
