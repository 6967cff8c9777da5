//! A concurrency limit whose bound can change while permits are out (a
//! function's limit follows its ready replicas).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct Limit {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug)]
struct State {
    used: usize,
    max: usize,
}

/// One unit of a [`Limit`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<Limit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut s) = self.limit.state.lock() {
            s.used = s.used.saturating_sub(1);
        }
        self.limit.notify.notify_waiters();
    }
}

impl Limit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { used: 0, max }),
            notify: Notify::new(),
        })
    }

    /// Changes the bound; permits already out stay valid.
    pub fn set_max(&self, max: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.max = max;
        }
        self.notify.notify_waiters();
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.state.lock().map(|s| s.max).unwrap_or(0)
    }

    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.used).unwrap_or(0)
    }

    pub fn available(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.max.saturating_sub(s.used))
            .unwrap_or(0)
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.state.lock().ok()?;
        if s.used < s.max {
            s.used += 1;
            Some(Permit {
                limit: Arc::clone(self),
            })
        } else {
            None
        }
    }

    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.try_acquire() {
                return p;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bound_holds_and_can_change() {
        let l = Limit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_use(), 2);

        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.in_use(), 2);

        // Lowering the bound below what is out blocks new permits until enough return.
        l.set_max(1);
        drop(c);
        assert!(l.try_acquire().is_none());
        l.set_max(3);
        assert!(l.try_acquire().is_some());
    }
}
