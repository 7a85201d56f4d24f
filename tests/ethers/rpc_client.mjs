// ethers v6 as a real client of the gateway's JSON-RPC signer (run by tests/api/test_evm_rpc.py).
//
// The gateway's URL is argv[2]; the bearer token comes in ECNY_TOKEN (never argv: secrets stay out of
// process listings); the tasks come as JSON on stdin. One JSON object of results goes to stdout; ethers
// itself checks each signature (Transaction.from, verifyMessage, verifyTypedData), and the Python test
// checks them again with eth-account.
import { FetchRequest, JsonRpcProvider, Transaction, verifyMessage, verifyTypedData } from "ethers";

const url = process.argv[2];
const token = process.env.ECNY_TOKEN;
const tasks = JSON.parse(await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => resolve(text));
}));

const request = new FetchRequest(url);
request.setHeader("Authorization", `Bearer ${token}`);
// The provider batches concurrent calls into one JSON-RPC batch (ethers' default), as applications do.
const provider = new JsonRpcProvider(request, undefined, { staticNetwork: false });

const out = {};
try {
  out.chainId = (await provider.getNetwork()).chainId.toString();
  out.accounts = (await provider.listAccounts()).map((signer) => signer.address);
  const signer = await provider.getSigner(tasks.address);
  if (tasks.send) {
    out.sentHash = await signer.sendUncheckedTransaction(tasks.send);
  }

  const raw = await signer.signTransaction(tasks.transaction);
  out.rawTransaction = raw;
  out.transactionFrom = Transaction.from(raw).from;

  const [first, second] = await Promise.all([
    signer.signTransaction({ ...tasks.transaction, value: 1n }),
    signer.signTransaction({ ...tasks.transaction, value: 2n }),
  ]);
  out.batched = [Transaction.from(first).nonce, Transaction.from(second).nonce];

  if (tasks.typedData) {
    const { domain, types, message } = tasks.typedData;
    const signature = await signer.signTypedData(domain, types, message);
    out.typedDataSignature = signature;
    out.typedDataSigner = verifyTypedData(domain, types, message, signature);
  }
  if (tasks.messageAddress) {
    const messageSigner = await provider.getSigner(tasks.messageAddress);
    const signature = await messageSigner.signMessage(tasks.message);
    out.messageSignature = signature;
    out.messageSigner = verifyMessage(tasks.message, signature);
  }
  if (tasks.refused) {
    try {
      await signer.signTransaction(tasks.refused);
      out.refusedError = null;
    } catch (error) {
      out.refusedError = { code: error.error?.code ?? null, data: error.error?.data ?? null };
    }
  }
} finally {
  provider.destroy();
}
process.stdout.write(JSON.stringify(out));
