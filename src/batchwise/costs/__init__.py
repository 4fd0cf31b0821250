"""Money: pricing, the savings ledger rules, reports of savings, forecasts, alerts and the
cost guards."""
