//! Load balancing over a service's endpoints: power of two choices on the number of active
//! connections. The counts live here, in the `DataPath`, keyed by endpoint address, so they
//! survive snapshot swaps; an `ActiveGuard` held for a connection's life decrements on drop.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Active connections per endpoint (entries at zero are removed).
#[derive(Debug, Default)]
pub struct ActiveConnections {
    counts: DashMap<SocketAddr, usize>,
}

/// A uniform random index below `n` (n > 0).
fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    // The modulo bias is negligible for endpoint counts far below 2^64.
    (u64::from_be_bytes(bytes) % n as u64) as usize
}

impl ActiveConnections {
    pub fn active(&self, endpoint: &SocketAddr) -> usize {
        self.counts.get(endpoint).map_or(0, |c| *c)
    }

    /// Picks among `candidates` (not empty): two distinct ones at random, the less loaded wins.
    pub fn pick(&self, candidates: &[SocketAddr]) -> usize {
        match candidates.len() {
            0 | 1 => 0,
            n => {
                let a = random_below(n);
                let b = (a + 1 + random_below(n - 1)) % n;
                if self.active(&candidates[b]) < self.active(&candidates[a]) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// Counts a connection to `endpoint` until the guard is dropped.
    pub fn track(self: &Arc<Self>, endpoint: SocketAddr) -> ActiveGuard {
        *self.counts.entry(endpoint).or_insert(0) += 1;
        ActiveGuard {
            table: self.clone(),
            endpoint,
        }
    }
}

/// One active connection to an endpoint.
#[derive(Debug)]
pub struct ActiveGuard {
    table: Arc<ActiveConnections>,
    endpoint: SocketAddr,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Entry::Occupied(mut entry) = self.table.counts.entry(self.endpoint) {
            *entry.get_mut() = entry.get().saturating_sub(1);
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Discovered, Held, LocalConfig, MeshSnapshot, Route};
    use latch_mesh::{Service, ServicePort};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn guards_count_and_clean_up() {
        let table = Arc::new(ActiveConnections::default());
        let a = addr("10.0.0.1:80");
        let g1 = table.track(a);
        let g2 = table.track(a);
        assert_eq!(table.active(&a), 2);
        drop(g1);
        assert_eq!(table.active(&a), 1);
        drop(g2);
        assert_eq!(table.active(&a), 0);
        assert!(table.counts.is_empty());
    }

    #[test]
    fn spreads_new_connections_over_the_endpoints() {
        let table = Arc::new(ActiveConnections::default());
        let endpoints: Vec<SocketAddr> = (1..=4).map(|i| addr(&format!("10.0.0.{i}:80"))).collect();
        let mut guards = Vec::new();
        for _ in 0..400 {
            let i = table.pick(&endpoints);
            guards.push(table.track(endpoints[i]));
        }
        for e in &endpoints {
            let n = table.active(e);
            // Two choices keep the spread tight: far from the 0 or 400 a stuck pick gives.
            assert!((60..=140).contains(&n), "{e}: {n} of 400");
        }
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let table = Arc::new(ActiveConnections::default());
        let (busy, idle) = (addr("10.0.0.1:80"), addr("10.0.0.2:80"));
        let _guards: Vec<_> = (0..5).map(|_| table.track(busy)).collect();
        for _ in 0..50 {
            assert_eq!(table.pick(&[busy, idle]), 1);
        }
    }

    #[test]
    fn never_picks_a_removed_endpoint() {
        let service = |endpoints: &[&str]| {
            let mut d = Discovered::default();
            d.services.insert(
                "demo/api".into(),
                Held {
                    version: "1".into(),
                    value: Service {
                        name: "api".into(),
                        namespace: "demo".into(),
                        vips: vec!["10.96.0.1".parse().unwrap()],
                        hostnames: Vec::new(),
                        ports: vec![ServicePort {
                            port: 80,
                            target_port: 8080,
                            name: "http".into(),
                        }],
                        endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
                    },
                },
            );
            MeshSnapshot::build(&d, &LocalConfig::default())
        };
        let table = Arc::new(ActiveConnections::default());
        let before = service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let mut guards = Vec::new();
        for _ in 0..30 {
            if let Route::Passthrough(to) = before.route(addr("10.96.0.1:80"), |c| table.pick(c)) {
                guards.push(table.track(to));
            }
        }
        // 10.0.0.2 goes away while it has connections; new ones never go there.
        let after = service(&["10.0.0.1", "10.0.0.3"]);
        for _ in 0..200 {
            let route = after.route(addr("10.96.0.1:80"), |c| table.pick(c));
            assert_ne!(route, Route::Passthrough(addr("10.0.0.2:8080")));
            assert!(matches!(route, Route::Passthrough(_)), "{route:?}");
        }
    }
}
