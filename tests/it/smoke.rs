use std::time::Duration;

use serde_json::json;

use crate::harness::{shared, WorkerProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_completes_a_noop_job() {
    let db = shared().database(true).await;
    let _w = WorkerProcess::spawn(&db.url, &[]);
    let id = db.noop_job(json!({})).await;
    db.wait_status(id, "completed", Duration::from_secs(10))
        .await;
}
