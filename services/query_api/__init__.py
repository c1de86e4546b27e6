"""Query API: HTTP in → read model (plain SQL) → JSON / CSV out."""
