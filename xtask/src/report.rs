//! Test-count bookkeeping: libtest's `test result:` lines and the final summary.
use std::{fmt, time::Duration};

/// Tests passed/failed as reported by libtest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, rhs: Self) {
        self.passed += rhs.passed;
        self.failed += rhs.failed;
    }
}

/// Parses `test result: ok. 3 passed; 1 failed; 0 ignored; ...`.
pub fn parse_libtest(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let n = |w: &[&str]| w.iter().rev().nth(1).and_then(|n| n.parse::<u64>().ok());
        match words.last() {
            Some(&"passed") => counts.passed = n(&words)?,
            Some(&"failed") => counts.failed = n(&words)?,
            _ => {}
        }
    }
    Some(counts)
}

/// One step of `cargo xtask test`.
#[derive(Debug)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub counts: Counts,
    pub elapsed: Duration,
    pub note: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.ok { "PASS" } else { "FAIL" };
        write!(
            f,
            "{status}  {:<22} {:>7.1}s",
            self.name,
            self.elapsed.as_secs_f64()
        )?;
        if self.counts != Counts::default() {
            write!(
                f,
                "  tests: {} passed, {} failed",
                self.counts.passed, self.counts.failed
            )?;
        }
        if !self.note.is_empty() {
            write!(f, "  ({})", self.note)?;
        }
        Ok(())
    }
}

/// Totals for the closing line: every test libtest counted, plus each failed step that
/// reported no failed test (a lint, build or harness failure) as one failure, so a red run can
/// never print `0 failed`.
pub fn totals(steps: &[Step]) -> Counts {
    let mut total = Counts::default();
    for step in steps {
        total += step.counts;
        if !step.ok && step.counts.failed == 0 {
            total.failed += 1;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summary() {
        let line = "test result: FAILED. 12 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(
            parse_libtest(line),
            Some(Counts {
                passed: 12,
                failed: 2
            })
        );
        assert_eq!(parse_libtest("running 3 tests"), None);
    }

    #[test]
    fn failed_step_without_tests_counts_as_a_failure() {
        let step = |ok, passed, failed| Step {
            name: "x".into(),
            ok,
            counts: Counts { passed, failed },
            elapsed: Duration::ZERO,
            note: String::new(),
        };
        let steps = [step(true, 5, 0), step(false, 0, 0), step(false, 3, 2)];
        assert_eq!(
            totals(&steps),
            Counts {
                passed: 8,
                failed: 3
            }
        );
    }
}
