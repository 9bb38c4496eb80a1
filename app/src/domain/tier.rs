//! Tiers by lifetime earned points. The thresholds live here and nowhere else: the server decides
//! tier changes with them and the portal page draws the progress bar with them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub enum Tier {
    #[default]
    Bronze,
    Silver,
    Gold,
    Platinum,
}

/// Every tier with the lifetime points it starts at, lowest first.
pub const TIERS: [(Tier, u64); 4] =
    [(Tier::Bronze, 0), (Tier::Silver, 1_000), (Tier::Gold, 5_000), (Tier::Platinum, 20_000)];

impl Tier {
    /// The tier a member holds with this many lifetime points (tiers are never lost).
    pub fn for_lifetime(lifetime: u64) -> Tier {
        TIERS.iter().rev().find(|(_, threshold)| lifetime >= *threshold).map(|(tier, _)| *tier).unwrap_or(Tier::Bronze)
    }

    pub fn threshold(self) -> u64 {
        TIERS.iter().find(|(tier, _)| *tier == self).map(|(_, t)| *t).unwrap_or(0)
    }

    pub fn next(self) -> Option<Tier> {
        match self {
            Tier::Bronze => Some(Tier::Silver),
            Tier::Silver => Some(Tier::Gold),
            Tier::Gold => Some(Tier::Platinum),
            Tier::Platinum => None,
        }
    }

    /// Purchase multiplier as a fraction (numerator, denominator), so points stay integers:
    /// bronze 1, silver 1.25, gold 1.5, platinum 2.
    pub fn multiplier(self) -> (u64, u64) {
        match self {
            Tier::Bronze => (1, 1),
            Tier::Silver => (5, 4),
            Tier::Gold => (3, 2),
            Tier::Platinum => (2, 1),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Bronze => "bronze",
            Tier::Silver => "silver",
            Tier::Gold => "gold",
            Tier::Platinum => "platinum",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Tier::Bronze => "Bronze",
            Tier::Silver => "Silver",
            Tier::Gold => "Gold",
            Tier::Platinum => "Platinum",
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        TIERS.iter().map(|(t, _)| *t).find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Points a purchase earns: one per whole currency unit, times the tier multiplier, rounded down.
pub fn purchase_points(amount_cents: u64, tier: Tier) -> u64 {
    let (num, den) = tier.multiplier();
    (amount_cents / 100) * num / den
}

/// Progress towards the next tier: (next tier, points still needed, percent of the way there).
pub fn progress(lifetime: u64) -> Option<(Tier, u64, u8)> {
    let tier = Tier::for_lifetime(lifetime);
    let next = tier.next()?;
    let (from, to) = (tier.threshold(), next.threshold());
    let percent = ((lifetime - from) * 100 / (to - from)).min(100) as u8;
    Some((next, to - lifetime, percent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_follows_lifetime_thresholds() {
        assert_eq!(Tier::for_lifetime(0), Tier::Bronze);
        assert_eq!(Tier::for_lifetime(999), Tier::Bronze);
        assert_eq!(Tier::for_lifetime(1_000), Tier::Silver);
        assert_eq!(Tier::for_lifetime(4_999), Tier::Silver);
        assert_eq!(Tier::for_lifetime(5_000), Tier::Gold);
        assert_eq!(Tier::for_lifetime(20_000), Tier::Platinum);
        assert_eq!(Tier::for_lifetime(u64::MAX), Tier::Platinum);
    }

    #[test]
    fn purchase_points_apply_the_multiplier_and_round_down() {
        assert_eq!(purchase_points(12_345, Tier::Bronze), 123);
        assert_eq!(purchase_points(12_345, Tier::Silver), 153); // 123 * 1.25 = 153.75
        assert_eq!(purchase_points(12_345, Tier::Gold), 184); // 123 * 1.5 = 184.5
        assert_eq!(purchase_points(12_345, Tier::Platinum), 246);
        assert_eq!(purchase_points(99, Tier::Platinum), 0);
    }

    #[test]
    fn progress_counts_from_the_current_tier_and_stops_at_platinum() {
        assert_eq!(progress(0), Some((Tier::Silver, 1_000, 0)));
        assert_eq!(progress(500), Some((Tier::Silver, 500, 50)));
        assert_eq!(progress(3_000), Some((Tier::Gold, 2_000, 50)));
        assert_eq!(progress(20_000), None);
    }
}
