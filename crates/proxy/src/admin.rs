//! The proxy's admin HTTP endpoints: /healthz, /ready (a valid SVID is held), /metrics and
//! /debug/certs (the SVID and bundle as JSON).

use std::sync::Arc;
use std::time::SystemTime;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use latch_admin::{HttpResponse, error, json, text};
use latch_identity::svid::format_time;
use serde::Serialize;

use crate::identity::IdentityAgent;
use crate::metrics::Metrics;

pub struct AdminState {
    pub agent: Arc<IdentityAgent>,
    pub metrics: Arc<Metrics>,
}

#[derive(Serialize)]
struct CertsView {
    spiffe_id: Option<String>,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    expired: bool,
    next_rotation: Option<String>,
    bundle_fingerprints_sha256: Vec<String>,
}

impl AdminState {
    fn ready(&self) -> Result<(), String> {
        let store = self.agent.store();
        match store.svid() {
            None => Err("no SVID yet".into()),
            Some(svid) if svid.info().is_expired_at(SystemTime::now()) => Err(format!(
                "SVID expired at {} and could not be renewed",
                format_time(svid.info().not_after)
            )),
            Some(_) => Ok(()),
        }
    }

    fn certs(&self) -> CertsView {
        let store = self.agent.store();
        let svid = store.svid();
        let info = svid.as_ref().map(|s| s.info());
        CertsView {
            spiffe_id: info.map(|i| i.id.to_string()),
            serial: info.map(|i| i.serial.clone()),
            not_before: info.map(|i| format_time(i.not_before)),
            not_after: info.map(|i| format_time(i.not_after)),
            expired: info.is_some_and(|i| i.is_expired_at(SystemTime::now())),
            next_rotation: self.agent.next_rotation().map(format_time),
            bundle_fingerprints_sha256: store.bundle().fingerprints(),
        }
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => latch_admin::readiness(self.ready()),
            (&Method::GET, "/metrics") => latch_admin::metrics(self.metrics.registry()),
            (&Method::GET, "/debug/certs") => json(StatusCode::OK, &self.certs()),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}
