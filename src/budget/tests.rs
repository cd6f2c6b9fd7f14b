use std::str::FromStr;
use std::time::Duration;

use super::*;

/// A clock the test moves by hand.
struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    fn at(time: SystemTime) -> Arc<ManualClock> {
        Arc::new(ManualClock(Mutex::new(time)))
    }

    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap();
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

fn usd(text: &str) -> Amount {
    Amount::from_usd(Decimal::from_str(text).unwrap()).unwrap()
}

fn budgets() -> Arc<Budgets> {
    Budgets::new(Arc::new(SystemClock))
}

#[test]
fn amounts_convert_exactly_and_refuse_nonsense() {
    assert_eq!(usd("500").to_usd(), Decimal::from(500));
    assert_eq!(usd("0.000000000001"), Amount(1));
    assert_eq!(Amount::from_usd(Decimal::from_str("-1").unwrap()), None);
    assert_eq!(
        Amount::from_usd(Decimal::from_str("0.0000000000001").unwrap()),
        None
    );
    assert_eq!(
        Amount::from_usd(Decimal::from_str("1000000.01").unwrap()),
        None
    );
}

#[test]
fn slices_come_out_of_the_parent_room() {
    let b = budgets();
    b.add_root(1, usd("500"));
    for (child, slice) in [(2, "50"), (3, "80"), (4, "120"), (5, "100")] {
        b.delegate(1, child, usd(slice)).unwrap();
    }
    assert_eq!(b.view(1).unwrap().available, usd("150"));

    let err = b.delegate(1, 6, usd("150.01")).unwrap_err();
    assert_eq!(
        err,
        BudgetError::Exceeded {
            needed: usd("150.01"),
            available: usd("150"),
            limit: usd("500"),
        }
    );
    assert!(
        b.view(6).is_none(),
        "a refused spawn leaves no budget behind"
    );
}

#[test]
fn reservations_hold_room_until_settled() {
    let b = budgets();
    b.add_root(1, usd("1"));
    let first = b.reserve(1, usd("0.6")).unwrap();
    assert!(matches!(
        b.reserve(1, usd("0.5")),
        Err(BudgetError::Exceeded { .. })
    ));

    first.settle(usd("0.1"));
    let view = b.view(1).unwrap();
    assert_eq!(
        (view.spent, view.reserved, view.available),
        (usd("0.1"), Amount::ZERO, usd("0.9"))
    );

    let dropped = b.reserve(1, usd("0.5")).unwrap();
    drop(dropped);
    assert_eq!(
        b.view(1).unwrap().spent,
        usd("0.6"),
        "an unsettled reservation counts as spent"
    );
}

#[test]
fn a_child_at_its_limit_stops_alone() {
    let b = budgets();
    b.add_root(1, usd("10"));
    b.delegate(1, 2, usd("1")).unwrap();
    b.delegate(1, 3, usd("1")).unwrap();

    b.reserve(2, usd("1")).unwrap().settle(usd("1"));
    assert!(matches!(
        b.reserve(2, usd("0.01")),
        Err(BudgetError::Exceeded { .. })
    ));
    b.reserve(3, usd("0.5")).unwrap().settle(usd("0.5"));
    b.reserve(1, usd("8")).unwrap().settle(usd("8"));
    assert_eq!(b.available(1), Amount::ZERO);
}

/// A child ended after its parent (published just after the parent's end) still
/// returns its unspent slice, through the ended parent to the lead.
#[test]
fn a_child_ended_after_its_parent_returns_its_slice_to_the_lead() {
    let b = budgets();
    b.add_root(1, usd("100"));
    b.delegate(1, 2, usd("40")).unwrap();
    b.reserve(2, usd("5")).unwrap().settle(usd("5"));
    b.delegate(2, 3, usd("10")).unwrap();
    b.reserve(3, usd("2")).unwrap().settle(usd("2"));

    b.end(2);
    assert_eq!(
        b.view(1).unwrap().available,
        usd("85"),
        "the child's whole slice counts"
    );
    b.end(3);
    assert_eq!(
        b.view(1).unwrap().available,
        usd("93"),
        "what was spent stays spent: 5 by the parent, 2 by the child"
    );
}

/// The same across a day change: what the parent passed up belonged to the day it
/// ended, so the next day's counters are left alone.
#[test]
fn a_child_ended_after_its_parent_on_the_next_day_changes_nothing_then() {
    let clock = ManualClock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 20_000));
    let b = Budgets::new(clock.clone());
    b.add_root(1, usd("100"));
    b.delegate(1, 2, usd("40")).unwrap();
    b.delegate(2, 3, usd("10")).unwrap();
    b.delegate(1, 4, usd("30")).unwrap();
    b.end(2);

    clock.advance(Duration::from_secs(86_400));
    b.reserve(4, usd("20")).unwrap().settle(usd("20"));
    b.end(4);
    assert_eq!(
        b.view(1).unwrap().available,
        usd("80"),
        "today: 20 spent by 4"
    );
    b.end(3);
    assert_eq!(
        b.view(1).unwrap().available,
        usd("80"),
        "3's slice was yesterday's"
    );
}

#[test]
fn ending_a_child_returns_its_unspent_slice() {
    let b = budgets();
    b.add_root(1, usd("100"));
    b.delegate(1, 2, usd("40")).unwrap();
    b.reserve(2, usd("10")).unwrap().settle(usd("7"));
    let in_flight = b.reserve(2, usd("3")).unwrap();

    b.end(2);
    let lead = b.view(1).unwrap();
    assert_eq!(
        (lead.delegated, lead.ended_children, lead.available),
        (Amount::ZERO, usd("10"), usd("90"))
    );
    assert_eq!(b.reserve(2, usd("1")).err(), Some(BudgetError::Ended(2)));

    in_flight.settle(usd("1"));
    assert_eq!(
        b.view(1).unwrap().available,
        usd("90"),
        "in-flight spend stays counted"
    );
}

#[test]
fn a_frozen_ancestor_blocks_its_descendants() {
    let b = budgets();
    b.add_root(1, usd("100"));
    b.delegate(1, 2, usd("10")).unwrap();
    b.delegate(2, 3, usd("5")).unwrap();

    b.freeze(2);
    assert_eq!(b.reserve(3, usd("1")).err(), Some(BudgetError::Frozen(2)));
    assert_eq!(b.available(3), Amount::ZERO);
    assert!(b.reserve(1, usd("1")).is_ok(), "the parent carries on");
}

#[test]
fn spend_resets_at_utc_midnight() {
    let just_before_midnight = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 - 1);
    let clock = ManualClock::at(just_before_midnight);
    let b = Budgets::new(clock.clone());
    b.add_root(1, usd("10"));
    b.delegate(1, 2, usd("4")).unwrap();
    b.reserve(1, usd("6")).unwrap().settle(usd("6"));
    assert_eq!(b.available(1), Amount::ZERO);

    clock.advance(Duration::from_secs(1));
    let view = b.view(1).unwrap();
    assert_eq!(
        (view.spent, view.delegated, view.available),
        (Amount::ZERO, usd("4"), usd("6"))
    );
}

/// Many threads reserving and settling against one lead and its children never take
/// any agent past its limit, and the parent invariant holds at the end.
#[test]
fn concurrent_reservations_never_pass_a_limit() {
    let b = budgets();
    b.add_root(1, usd("100"));
    for child in 2..10 {
        b.delegate(1, child, usd("10")).unwrap();
    }

    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let b = &b;
            scope.spawn(move || {
                let mut seed = thread * 7919 + 1;
                for _ in 0..20_000 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let agent = 1 + (seed >> 33) % 9;
                    let amount = Amount((seed >> 40) % 1_000_000_000_000 + 1);
                    if let Ok(reservation) = b.reserve(agent, amount) {
                        let actual = Amount(reservation.amount().0 / ((seed >> 20) % 3 + 1));
                        reservation.settle(actual);
                    }
                }
            });
        }
    });

    let mut children_committed = Amount::ZERO;
    for child in 2..10 {
        let view = b.view(child).unwrap();
        assert!(view.spent <= view.limit, "child {child}: {view:?}");
        assert_eq!(view.reserved, Amount::ZERO);
        children_committed = children_committed + view.limit;
    }
    let lead = b.view(1).unwrap();
    assert_eq!(lead.delegated, children_committed);
    assert!(lead.spent + lead.delegated <= lead.limit, "{lead:?}");
}

#[test]
fn reserve_up_to_takes_what_fits_or_refuses_below_the_floor() {
    let b = budgets();
    b.add_root(1, usd("1"));
    let held = b.reserve_up_to(1, usd("0.1"), usd("5")).unwrap();
    assert_eq!(held.amount(), usd("1"));
    assert!(matches!(
        b.reserve_up_to(1, usd("0.1"), usd("5")),
        Err(BudgetError::Exceeded { .. })
    ));
    held.settle(usd("0.5"));
    assert_eq!(
        b.reserve_up_to(1, usd("0.1"), usd("0.2")).unwrap().amount(),
        usd("0.2")
    );
}
