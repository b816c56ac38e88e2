//! The embedding endpoints: one or more servers for the same model
//! (`embed.url` lists them, comma-separated), so that one Ollama box is not
//! the ceiling of a deployment.
//!
//! A request goes to the endpoint in rotation with the fewest requests
//! outstanding (ties taken in turn), which spreads batches by load rather
//! than by count: a slow server gets fewer. An endpoint that stops
//! answering leaves the rotation at once, its request goes to another, and
//! the embedder probes it until it embeds again. Only when every endpoint is
//! out do requests go to them anyway: the job's own retries, and then the
//! queue's outage pause, take over as they do for a single server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::observe::metrics;

/// Why and since when an endpoint is out of rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub since: SystemTime,
    pub error: String,
}

struct Endpoint {
    url: String,
    in_flight: AtomicUsize,
    out: Mutex<Option<Out>>,
}

pub struct Endpoints {
    list: Vec<Endpoint>,
    turn: AtomicUsize,
}

/// A request counted against its endpoint until dropped.
pub struct InFlight<'a> {
    endpoint: &'a Endpoint,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoints {
    pub fn new(urls: Vec<String>) -> Endpoints {
        assert!(!urls.is_empty(), "the configuration guarantees one URL");
        let list: Vec<Endpoint> = urls
            .into_iter()
            .map(|url| Endpoint {
                url: url.trim_end_matches('/').to_string(),
                in_flight: AtomicUsize::new(0),
                out: Mutex::new(None),
            })
            .collect();
        for e in &list {
            metrics::embed_endpoint_up(&e.url, true);
        }
        Endpoints {
            list,
            turn: AtomicUsize::new(0),
        }
    }

    pub fn count(&self) -> usize {
        self.list.len()
    }

    pub fn url(&self, index: usize) -> &str {
        &self.list[index].url
    }

    /// The endpoint for the next request, counted as outstanding until the
    /// guard drops: the one in rotation with the fewest outstanding; when
    /// none is in rotation, the one with the fewest of all.
    pub fn pick(&self) -> (usize, InFlight<'_>) {
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let n = self.list.len();
        let candidates = (0..n).map(|k| (start + k) % n);
        let in_rotation = candidates.clone().filter(|&i| !self.is_out(i));
        let load = |&i: &usize| self.list[i].in_flight.load(Ordering::Relaxed);
        let index = in_rotation
            .min_by_key(load)
            .or_else(|| candidates.min_by_key(load))
            .expect("at least one endpoint");
        let endpoint = &self.list[index];
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        (index, InFlight { endpoint })
    }

    pub fn is_out(&self, index: usize) -> bool {
        self.list[index].out.lock().unwrap().is_some()
    }

    /// Takes the endpoint out of rotation. True when it was in (the caller
    /// then starts its probe; exactly one caller sees true).
    pub fn take_out(&self, index: usize, error: &str) -> bool {
        let endpoint = &self.list[index];
        let mut out = endpoint.out.lock().unwrap();
        if out.is_some() {
            return false;
        }
        *out = Some(Out {
            since: SystemTime::now(),
            error: error.to_string(),
        });
        metrics::embed_endpoint_up(&endpoint.url, false);
        true
    }

    /// Puts the endpoint back in rotation. True when it was out.
    pub fn put_back(&self, index: usize) -> bool {
        let endpoint = &self.list[index];
        let was_out = endpoint.out.lock().unwrap().take().is_some();
        if was_out {
            metrics::embed_endpoint_up(&endpoint.url, true);
        }
        was_out
    }

    pub fn in_rotation(&self) -> usize {
        (0..self.list.len()).filter(|&i| !self.is_out(i)).count()
    }

    /// Each endpoint's URL and, when it is out of rotation, why.
    pub fn states(&self) -> Vec<(String, Option<Out>)> {
        self.list
            .iter()
            .map(|e| (e.url.clone(), e.out.lock().unwrap().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Endpoints {
        Endpoints::new(vec![
            "http://a".into(),
            "http://b/".into(),
            "http://c".into(),
        ])
    }

    #[test]
    fn requests_go_to_the_least_loaded_endpoint() {
        let e = three();
        let (first, _a) = e.pick();
        let (second, _b) = e.pick();
        let (third, _c) = e.pick();
        let mut used = vec![first, second, third];
        used.sort();
        assert_eq!(used, vec![0, 1, 2], "three requests, three endpoints");
        // One finishes: the next request goes where it was.
        drop(_b);
        let (next, _d) = e.pick();
        assert_eq!(next, second);
        assert_eq!(e.url(1), "http://b");
    }

    #[test]
    fn an_endpoint_out_of_rotation_gets_nothing_until_it_is_back() {
        let e = three();
        assert!(e.take_out(1, "refused"));
        assert!(
            !e.take_out(1, "refused again"),
            "only the first caller probes"
        );
        for _ in 0..10 {
            let (i, _guard) = e.pick();
            assert_ne!(i, 1);
        }
        assert_eq!(e.in_rotation(), 2);
        assert_eq!(e.states()[1].1.as_ref().unwrap().error, "refused");
        assert!(e.put_back(1));
        assert!(!e.put_back(1));
        let picked: Vec<usize> = (0..3).map(|_| e.pick().0).collect();
        assert!(picked.contains(&1), "{picked:?}");
    }

    #[test]
    fn with_every_endpoint_out_requests_still_go_somewhere() {
        let e = three();
        for i in 0..3 {
            e.take_out(i, "down");
        }
        let (_, _a) = e.pick();
        let (_, _b) = e.pick();
        let (_, _c) = e.pick();
        let loads: Vec<usize> = e
            .list
            .iter()
            .map(|x| x.in_flight.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, vec![1, 1, 1], "spread over all of them");
    }
}
