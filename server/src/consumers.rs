//! Every consumer this server runs, grouped by the task that runs them (see `projector`).

use crate::processors::loyalty::LoyaltyPolicy;
use crate::projector::{member_search, membership_view, Consumer, Role};
use crate::store::Store;
use std::sync::Arc;

/// A group applies each batch in one transaction, each member with its own checkpoint row. The
/// two projections share one: they read the same events and write only their own tables, and on
/// SQLite's single write connection one commit per batch instead of two is most of the saving.
/// The loyalty policy runs alone: it appends events and takes the append lock, which projections
/// need not wait for.
pub fn groups(store: &Store) -> Vec<Vec<(Arc<dyn Consumer>, Role)>> {
    vec![
        vec![
            (Arc::new(membership_view::MembershipViewProjection::default()), Role::LiveViews),
            (Arc::new(member_search::MemberSearchProjection::default()), Role::Projection),
        ],
        vec![(Arc::new(LoyaltyPolicy { heads: store.heads.clone() }), Role::Processor)],
    ]
}
