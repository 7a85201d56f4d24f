"""Hard wallets: register two devices, load one with a signed voucher, pay offline from one to the
other, and sync both. The devices are the gateway's software simulator (a real hard wallet does the
same over its serial link; see the teller UI)."""

import base64
import json

from ecny import call, login, open_wallet

from gateway.hardwallet.simulator import SimulatedDevice

teller = login("teller1")
devices = {}
for name, cash in (("payer", 20_000), ("payee", 0)):
    device = SimulatedDevice.create()
    info = device.info()
    registered = call("POST", "/v1/devices", teller, {
        "wallet_id": open_wallet(teller, name, cash_fen=cash), "device_id": info["device_id"],
        "public_key_pem": info["public_key_pem"], "model": info["model"]})
    # The device keeps its certificate, signed by the gateway's `voucher` key.
    device.certify(base64.b64decode(registered["certificate"]), registered["issuer_public_key_pem"])
    devices[name] = device
payer, payee = devices["payer"], devices["payee"]

# Online: the wallet's money moves into the offline reserve; the device gets a signed voucher.
load = call("POST", f"/v1/devices/{payer.state.device_id}/loads", teller, {"amount_fen": 5_000}, idempotent=True)
payer.load(base64.b64decode(load["voucher"]))

# Offline: device to device, no gateway involved.
payment = payer.pay(payee.state.device_id, 1_200)
payee.receive(payment["payment"], payment["certificate"])

# Online again: each device uploads its signed log (CBOR) and stores the signed acknowledgement.
reports = {}
for name, device in devices.items():
    device.export_log(0)
    report = call("POST", f"/v1/devices/{device.state.device_id}/sync", teller, data=device.export(),
                  content_type="application/cbor")
    device.ack_log(base64.b64decode(report["ack"]))
    reports[name] = report
print(json.dumps({"load": load, "payer_sync": reports["payer"], "payee_sync": reports["payee"]}))
