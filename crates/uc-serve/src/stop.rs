//! Stop sequences over streamed text: text is released only when no stop sequence can
//! still begin inside it, so a stop split across tokens is never half-sent.

/// Finds the first stop sequence in a growing text.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released: it may be the start of a stop sequence.
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds `piece`; returns the text now safe to release, and whether a stop sequence
    /// was found (then the returned text is everything before it, and the rest is
    /// discarded).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending.get(..at).unwrap_or_default().to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop sequence:
        // the earliest place a stop could still begin.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = self.pending.get(i..).unwrap_or_default();
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold_from);
        let out = std::mem::replace(&mut self.pending, rest);
        (out, false)
    }

    /// The held-back text (at the end of generation, when no stop can follow).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_stop_split_across_pieces_is_not_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_released_later() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.push("Nx"), ("ENx".to_string(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(m.push("abcd"), ("a".to_string(), true));
    }

    proptest! {
        /// Whatever the split into pieces, the released text is the text up to the first
        /// stop (or all of it), exactly as one search over the whole text gives.
        #[test]
        fn released_text_equals_whole_text_search(
            text in "[ab\\n€]{0,40}",
            stop in "[ab\\n€]{1,4}",
            cuts in prop::collection::vec(0usize..40, 0..8),
        ) {
            let mut bounds: Vec<usize> = cuts
                .into_iter()
                .map(|c| c.min(text.len()))
                .filter(|&c| text.is_char_boundary(c))
                .collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            bounds.dedup();
            let mut m = StopMatcher::new(vec![stop.clone()]);
            let mut out = String::new();
            let mut hit = false;
            for w in bounds.windows(2) {
                let (s, h) = m.push(&text[w[0]..w[1]]);
                out.push_str(&s);
                if h {
                    hit = true;
                    break;
                }
            }
            if !hit {
                out.push_str(&m.finish());
            }
            let expect = match text.find(&stop) {
                Some(i) => &text[..i],
                None => &text[..],
            };
            prop_assert_eq!(out, expect);
            prop_assert_eq!(hit, text.contains(&stop));
        }
    }
}
