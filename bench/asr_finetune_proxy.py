"""In-process proxy of federated fine-tuning of the ASR Conformer (issue 11 exploration, not a benchmark of fedaqt).

FedSGD: each round samples --cpr of the --clients client speakers, averages their float gradients on one batch of
--bs utterances and takes one server optimizer step (Adam eps 1e-8 or SGD m 0.9, optional cosine decay, clip 5);
--local > 1 with --client-lr runs FedAvg local SGD steps instead. No quantization, no Ray: it measures what the
recipe can learn, fast. Prints dev/real WER every --eval-every rounds. Example (session 13, best so far):
  fedaqt data speech --out /tmp/shift64 --text-shift --utterances-per-speaker 64
  fedaqt pretrain --data-dir /tmp/shift64 --steps 1500 --out /tmp/pre
  python bench/asr_finetune_proxy.py --data /tmp/shift64 --ckpt /tmp/pre/pretrained.pt --rounds 200 --lr 1e-3 --cosine --threads 2
"""
import sys, time, argparse, numpy as np, torch
p = argparse.ArgumentParser()
p.add_argument("--data"); p.add_argument("--ckpt"); p.add_argument("--rounds", type=int, default=150)
p.add_argument("--opt", default="adam"); p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--cpr", type=int, default=8); p.add_argument("--bs", type=int, default=8)
p.add_argument("--local", type=int, default=1); p.add_argument("--client-lr", type=float, default=0.0)
p.add_argument("--eval-every", type=int, default=25); p.add_argument("--threads", type=int, default=1)
p.add_argument("--clients", type=int, default=32); p.add_argument("--cosine", action="store_true")
p.add_argument("--specaug", type=int, default=0, help="SpecAugment: this many freq (F=15) and time (T=20) masks per utterance on client batches")
p.add_argument("--save", default="", help="write the final float state_dict here (torch.save)")
a = p.parse_args()
torch.set_num_threads(a.threads)
from fedaqt.config import RunConfig
from fedaqt.workloads.asr import ASRWorkload
wl = ASRWorkload(RunConfig(num_clients=a.clients, seed=0, options={"data_dir": a.data, "speaker_offset": 48, "init_checkpoint": a.ckpt, "dropout": 0.0, "real_eval_max": 120}))
wl.prepare(); m = wl.build_model(); m.checkpointing = False
params = [q for q in m.parameters()]
opt = torch.optim.Adam(params, lr=a.lr) if a.opt == "adam" else torch.optim.SGD(params, lr=a.lr, momentum=0.9)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / a.rounds)) if a.cosine else 1.0)
def ev(r):
    e = wl.evaluate(m, r); print(f"R{r} " + " ".join(f"{k}={v:.3f}" for k, v in e.items()), f"t={time.time()-t0:.0f}s", flush=True)
if a.specaug:
    import torchaudio
    fm, tm = torchaudio.transforms.FrequencyMasking(15, iid_masks=True), torchaudio.transforms.TimeMasking(20, iid_masks=True)
t0 = time.time(); ev(0)
rng = np.random.default_rng(0)
for r in range(1, a.rounds + 1):
    m.train()
    clients = rng.choice(a.clients, a.cpr, replace=False)
    acc = [torch.zeros_like(q) for q in params]; losses = []
    for c in clients:
        batches = wl.client_batches(int(c), r, a.local, a.bs)
        if a.specaug:
            for b in batches:
                x = b["feats"].transpose(1, 2)  # [B, F, T]
                for _ in range(a.specaug):
                    x = tm(fm(x))
                b["feats"] = x.transpose(1, 2).contiguous()
        if a.local == 1 and a.client_lr == 0:
            loss, _ = wl.loss(m, batches[0]); g = torch.autograd.grad(loss, params)
            for s, gi in zip(acc, g): s += gi / a.cpr
            losses.append(loss.item())
        else:
            start = [q.detach().clone() for q in params]
            for b in batches:
                loss, _ = wl.loss(m, b); g = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for q, gi in zip(params, g): q -= a.client_lr * gi
                losses.append(loss.item())
            with torch.no_grad():
                for s, q, q0 in zip(acc, params, start): s += (q0 - q) / a.cpr; q.copy_(q0)
    for q, s in zip(params, acc): q.grad = s
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step(); sched.step(); opt.zero_grad()
    if r % 10 == 0: print(f"  r{r} train_loss={np.mean(losses):.3f} t={time.time()-t0:.0f}s", flush=True)
    if r % a.eval_every == 0 or r == a.rounds: ev(r)
if a.save: torch.save(m.state_dict(), a.save)
