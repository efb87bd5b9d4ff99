//! Password hashing on a few dedicated threads that run at a lower CPU priority than the
//! request workers.
//!
//! A Django password check is ~100 ms of pure CPU (pbkdf2 at a million iterations). On a small
//! host the request workers and the checks compete for the same cores, and at equal priority a
//! burst of logins shows up in `/verify`'s tail latency. With a higher nice value the kernel
//! runs a check only when a worker does not want the core, and preempts it as soon as one does:
//! logins slow down under load, `/verify` does not. How many checks may *wait* for these
//! threads, and for how long, is bounded by [`HashPool::run_within`]
//! (`sessions.hash_queue_timeout`).

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use tokio::sync::Semaphore;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run to completion.
#[derive(Debug, thiserror::Error)]
pub enum HashPoolError {
    /// No thread became free within the allowed wait.
    #[error("no password hashing thread was free in time")]
    Busy,
    /// The job's thread panicked, or the pool has shut down.
    #[error("the password hashing thread failed")]
    Failed,
}

/// A fixed set of hashing threads fed by one queue, with one admission slot per thread.
/// Clones share the threads and the slots.
#[derive(Clone)]
pub struct HashPool {
    jobs: mpsc::Sender<Job>,
    /// Admits as many jobs as there are threads, so an admitted job never queues behind others
    /// and a caller that cannot be admitted in time is told so at once.
    slots: Arc<Semaphore>,
}

impl HashPool {
    /// Starts `threads` threads whose nice value is the process's plus `nice` (at most 19).
    pub fn new(threads: usize, nice: i32) -> std::io::Result<HashPool> {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("knoxgate-hash-{i}"))
                .spawn(move || {
                    crate::priority::lower_current_thread(nice, "password hashing threads");
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { return };
                        // A panicking job drops its reply sender; the caller sees an error and
                        // the thread lives on.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(HashPool {
            jobs,
            slots: Arc::new(Semaphore::new(threads)),
        })
    }

    /// Runs `f` once a thread is free, waiting at most `wait` for one.
    pub async fn run_within<T: Send + 'static>(
        &self,
        wait: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashPoolError> {
        let permit = tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned())
            .await
            .map_err(|_| HashPoolError::Busy)?
            .map_err(|_| HashPoolError::Failed)?;
        self.run(move || {
            let _permit = permit;
            f()
        })
        .await
    }

    /// Runs `f` if a thread is free now, else answers `Busy` at once: for work that can be
    /// left for later (a re-hash), which must not queue ahead of admitted password checks.
    pub async fn run_if_free<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashPoolError> {
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| HashPoolError::Busy)?;
        self.run(move || {
            let _permit = permit;
            f()
        })
        .await
    }

    /// Runs `f` on a hashing thread and waits for its result without blocking the caller's
    /// runtime thread. Takes no slot: callers go through `run_within` or `run_if_free`.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashPoolError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(f());
            }))
            .map_err(|_| HashPoolError::Failed)?;
        result.await.map_err(|_| HashPoolError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_pool_and_survive_panics() {
        let pool = HashPool::new(2, 0).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("knoxgate-hash-"));
        assert!(pool.run(|| panic!("boom")).await.is_err());
        // Both threads still serve after a panic.
        for i in 0..4 {
            assert_eq!(pool.run(move || i * 2).await.unwrap(), i * 2);
        }
    }

    #[tokio::test]
    async fn run_within_admits_one_job_per_thread_and_reports_busy() {
        let pool = Arc::new(HashPool::new(1, 0).unwrap());
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = Arc::clone(&pool);
        let first = tokio::spawn(async move {
            busy.run_within(Duration::from_secs(5), move || hold.recv().is_ok())
                .await
        });
        // Wait until the first job holds the only slot.
        while pool.slots.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        let second = pool.run_within(Duration::from_millis(50), || ()).await;
        assert!(matches!(second, Err(HashPoolError::Busy)), "{second:?}");
        // Work that can wait (a re-hash) does not queue behind it either.
        let later = pool.run_if_free(|| ()).await;
        assert!(matches!(later, Err(HashPoolError::Busy)), "{later:?}");
        release.send(()).unwrap();
        assert!(first.await.unwrap().unwrap());
        // The slot is free again.
        assert_eq!(
            pool.run_within(Duration::from_millis(50), || 7)
                .await
                .unwrap(),
            7
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_at_the_configured_nice_value() {
        let base = crate::priority::own_nice();
        let pool = HashPool::new(1, 7).unwrap();
        assert_eq!(
            pool.run(crate::priority::own_nice).await.unwrap(),
            (base + 7).min(19)
        );
        // This thread is untouched.
        assert_eq!(crate::priority::own_nice(), base);
    }
}
