"""DQN-style agent that picks every action with model.predict on a single state.

Report: https://github.com/inoryy/tensorflow2-deep-reinforcement-learning/issues/6
Known answer: predict_in_loop

python from_tensorflow_import_keras_predict_rl.py [STEPS]     (default 200)

A small Q-network plays a toy random-walk environment: each step calls model.predict(state) on one state to
choose an action, and every 25 steps (from the first on) the network learns from a bounded replay buffer with
train_on_batch. Every predict call builds a new input pipeline, iterator and callback list for a single row; a
little of that is never given back, so resident memory creeps up with the number of steps while the agent
itself holds nothing new (the replay buffer is a deque of fixed length).
"""

import sys
from collections import deque

import numpy as np
from tensorflow import keras

STATE_DIM, ACTIONS = 8, 4
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
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
    q_values = model.predict(state[None], verbose=0)[0]
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
