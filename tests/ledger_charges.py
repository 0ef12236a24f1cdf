"""A process charging a shared privacy ledger (tests/test_dp.py runs two at once)."""

from flare_lora.privacy.ledger import PrivacyLedger, epsilon


class OverBudget(Exception):
    pass


def charge_many(path: str, tally: str, count: int, budget: float | None) -> int:
    """A process charging ``count`` releases of one step to a shared ledger; how many it was refused."""
    ledger, refused = PrivacyLedger(path, tally=tally), 0

    def within(history):
        if budget is not None and epsilon(history, 1e-5) > budget:
            raise OverBudget("over")

    for _ in range(count):
        try:
            ledger.charge(1.0, 0.05, 1, check=within)
        except OverBudget:
            refused += 1
    return refused
