"""Hard wallets on a serial link: frames (COBS + CRC-32), protocol messages, the pyserial link and a
software simulator (``ecny-gateway device-sim``). See docs/device-protocol.md."""
