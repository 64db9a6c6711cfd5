"""What the tests share: waiting helpers, process fixtures, real Prometheus, PKI, Go builds."""
