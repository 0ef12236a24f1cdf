"""A plain NVFlare Client API trainer for NVFlare's own FedAvg recipe: no flare-lora code, no update
reference in its results. A 4 -> 1 linear model fits a fixed linear target from 32 site-seeded points.
Used by tests/test_client_dp_filter.py to check that a site's privacy.json DP works for any job.
"""

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel

flare.init()
torch.manual_seed(sum(map(ord, flare.get_site_name())))
x = torch.randn(32, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
model = torch.nn.Linear(4, 1)
while flare.is_running():
    received = flare.receive()
    if received is None:
        break
    model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    flare.send(FLModel(params=model.state_dict(), metrics={"loss": float(loss)}, meta={"NUM_STEPS_CURRENT_ROUND": 5}))
