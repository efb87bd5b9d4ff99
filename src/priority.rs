//! Thread CPU priority: work that must yield the cores to request handling (password checks,
//! demoted connections) runs on threads with a higher nice value.
//!
//! With a higher nice value the kernel runs such a thread only when the normal-priority
//! threads do not want the core, and preempts it as soon as one does.

/// Adds `nice` to the calling thread's nice value (at most 19). On Linux the nice value
/// belongs to the thread, and `setpriority(PRIO_PROCESS, tid)` sets it for that thread alone.
/// Elsewhere the call would renice the whole process, so it is not made. `what` names the
/// threads in the warning logged when the kernel refuses.
pub fn lower_current_thread(nice: i32, what: &str) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let tid = Some(rustix::thread::gettid());
        let lowered = getpriority_process(tid)
            .and_then(|current| setpriority_process(tid, (current + nice).min(19)));
        if let Err(e) = lowered {
            tracing::warn!(nice, error = %e, "could not lower the priority of the {what}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::info!(
        nice,
        "the {what} keep the process priority on this platform"
    );
}

/// The nice value of the calling thread, from `/proc/thread-self/stat` (field 19).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn own_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // The command name (field 2) may hold spaces; fields after its closing paren are plain.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(16).unwrap().parse().unwrap()
}
