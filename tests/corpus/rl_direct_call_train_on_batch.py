"""DQN-style agent that picks every action by calling the model directly, and learns with train_on_batch.

Report: https://github.com/tensorflow/tensorflow/issues/33030
Known answer: none

python rl_direct_call_train_on_batch.py [STEPS]     (default 300)

The same toy agent as a model.predict loop, written the way the report's answer suggests: each step calls
model(state, training=False) on one state (a plain eager call, no input pipeline), and every 25 steps it
learns from a bounded replay buffer with predict_on_batch and train_on_batch, whose functions are traced
once. After the first training step nothing new is kept, so resident memory stays flat.
"""

from tensorflow import keras

# isort: split
import sys
from collections import deque

import numpy as np

STATE_DIM, ACTIONS = 8, 4
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
moves = rng.standard_normal((ACTIONS, STATE_DIM)).astype("float32") * 0.1

model = keras.Sequential(
    [keras.Input((STATE_DIM,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(ACTIONS)]
)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")

replay = deque(maxlen=500)
state = rng.standard_normal(STATE_DIM).astype("float32")
total_reward, epsilon, gamma = 0.0, 0.3, 0.9
for step in range(steps):
    q_values = model(state[None], training=False)[0].numpy()
    action = int(rng.integers(ACTIONS)) if rng.random() < epsilon else int(np.argmax(q_values))
    next_state = np.clip(state + moves[action] + rng.normal(0, 0.05, STATE_DIM), -3, 3).astype("float32")
    reward = float(-np.abs(next_state).mean())
    replay.append((state, action, reward, next_state))
    total_reward += reward
    state = next_state
    if step % 25 == 0:
        batch = [replay[i] for i in rng.integers(len(replay), size=32)]
        states = np.stack([b[0] for b in batch])
        next_states = np.stack([b[3] for b in batch])
        targets = model.predict_on_batch(states)
        best_next = model.predict_on_batch(next_states).max(axis=1)
        for row, (_, a, r, _) in enumerate(batch):
            targets[row, a] = r + gamma * best_next[row]
        model.train_on_batch(states, targets)

print(f"{steps} steps, mean reward {total_reward / steps:.3f}")
