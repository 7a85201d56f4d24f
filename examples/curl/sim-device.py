"""The hard wallet's side of device.sh: the gateway's software simulator, kept in a state file.
A real hard wallet does the same over its serial link (the teller UI drives it).

usage: sim-device.py STATE info | certify CERT_B64 ISSUER_PEM | load VOUCHER_B64 | pay PAYEE_ID AMOUNT
                           | receive PAYMENT_B64 CERT_B64 | export (signed CBOR log on stdout) | ack ACK_B64
"""

import base64
import json
import sys
from pathlib import Path

from gateway.hardwallet.simulator import SimulatedDevice

device = SimulatedDevice.open(Path(sys.argv[1]))
command, arguments = sys.argv[2], sys.argv[3:]
if command == "info":
    print(json.dumps(device.info()))
elif command == "certify":
    print(json.dumps(device.certify(base64.b64decode(arguments[0]), arguments[1])))
elif command == "load":
    print(json.dumps(device.load(base64.b64decode(arguments[0]))))
elif command == "pay":
    made = device.pay(arguments[0], int(arguments[1]))
    print(json.dumps({"payment": base64.b64encode(made["payment"]).decode(),
                      "certificate": base64.b64encode(made["certificate"]).decode()}))
elif command == "receive":
    device.receive(base64.b64decode(arguments[0]), base64.b64decode(arguments[1]))
elif command == "export":
    device.export_log(0)
    sys.stdout.buffer.write(device.export())
elif command == "ack":
    print(json.dumps(device.ack_log(base64.b64decode(arguments[0]))))
else:
    raise SystemExit(__doc__)
