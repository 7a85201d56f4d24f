"""ecny-gateway: signs e-CNY wallet and stablecoin transactions with keys held in a PKCS#11 HSM."""

__version__ = "0.1.0"
