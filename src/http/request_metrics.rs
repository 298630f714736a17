//! Per-request HTTP metrics with handles registered once: after the first request of a
//! (route, method, status), recording is two atomic updates, with no label strings built,
//! hashed or allocated. Label values come from closed sets (matched route templates, a
//! method label, the status code), so the map stays small.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use metrics::{Counter, Histogram};

#[derive(Default)]
pub struct HttpMetrics {
    routes: RwLock<HashMap<Box<str>, Route>>,
}

#[derive(Default)]
struct Route {
    durations: HashMap<&'static str, Histogram>,
    counts: HashMap<(&'static str, u16), Counter>,
}

impl HttpMetrics {
    pub fn record(&self, route: &str, method: &'static str, status: u16, elapsed: Duration) {
        {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            if let Some(handles) = routes.get(route) {
                if let (Some(count), Some(duration)) = (
                    handles.counts.get(&(method, status)),
                    handles.durations.get(method),
                ) {
                    count.increment(1);
                    duration.record(elapsed.as_secs_f64());
                    return;
                }
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let handles = routes.entry(route.into()).or_default();
        let count = handles.counts.entry((method, status)).or_insert_with(|| {
            metrics::counter!("atlas_http_requests_total", "route" => route.to_owned(), "method" => method, "status" => status.to_string())
        });
        count.increment(1);
        let duration = handles.durations.entry(method).or_insert_with(|| {
            metrics::histogram!("atlas_http_request_duration_seconds", "route" => route.to_owned(), "method" => method)
        });
        duration.record(elapsed.as_secs_f64());
    }
}
