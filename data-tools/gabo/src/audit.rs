//! `gabo audit TYPE HOUR`: the proof that nothing was lost and nothing kept twice. The
//! gateways' ledger says how many events were acknowledged for the hour; each one must be in
//! the bucket, be a removed duplicate, or be in the late bucket.

use crate::hour::Hour;
use crate::store::{Marker, Store, StoreError};

/// The counts of one hour, as `gabo audit` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The hour's marker.
    pub marker: Marker,
    /// Events acknowledged for the hour, now (the ledger; for an ingested type, the marker's).
    pub accepted: u64,
    /// Late events of the hour, now.
    pub late: u64,
}

impl Audit {
    /// `Ok` when accepted = unique + duplicates + late; else what is off.
    pub fn check(&self) -> Result<(), String> {
        balance(
            self.accepted,
            self.marker.unique,
            self.marker.duplicates,
            self.late,
        )
    }
}

/// The rule, without I/O.
pub fn balance(accepted: u64, unique: u64, duplicates: u64, late: u64) -> Result<(), String> {
    let accounted = unique + duplicates + late;
    if accepted == accounted {
        Ok(())
    } else if accepted > accounted {
        Err(format!(
            "{} accepted events are missing (accepted {accepted} > unique {unique} + duplicates \
             {duplicates} + late {late})",
            accepted - accounted
        ))
    } else {
        Err(format!(
            "{} more events than were accepted (accepted {accepted} < unique {unique} + \
             duplicates {duplicates} + late {late}): a gateway's ledger was not written",
            accounted - accepted
        ))
    }
}

/// Reads the counts of `hour`; `None` when the hour is not closed.
pub async fn audit(
    store: &Store,
    type_name: &str,
    hour: Hour,
) -> Result<Option<Audit>, StoreError> {
    let Some(marker) = store.marker(type_name, hour).await? else {
        return Ok(None);
    };
    let ledger = store.accepted(type_name, hour).await?;
    let late = store.late(type_name, hour).await?;
    Ok(Some(Audit {
        accepted: if ledger > 0 { ledger } else { marker.accepted },
        late,
        marker,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_and_unbalanced() {
        assert!(balance(10, 7, 2, 1).is_ok());
        assert!(balance(11, 7, 2, 1)
            .unwrap_err()
            .contains("1 accepted events are missing"));
        assert!(balance(9, 7, 2, 1).unwrap_err().contains("ledger"));
    }
}
