"""Rollout workers: offload, render, generate with n samples, bridge turns, reward, advantages.

A group is ``n`` trajectories of one environment seed (GRPO): the first turn's prompt is
sampled ``n`` times in one request; each completion then continues as its own conversation,
one new picture per turn, bridged onto the ids exactly as sampled. When the group is done,
each trajectory becomes one training :class:`~mmstore_client.samples.Sample` with the
group-normalised advantage of its total reward.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, field

from mmstore_client import AsyncStoreClient, ConflictError
from mmstore_client.descriptor import ProcessedPayloadError, reject_processed
from mmstore_client.inference import AsyncInferenceClient, GenerateRequest, SamplingOptions
from mmstore_client.offload import aoffload_messages
from mmstore_client.placeholders import PlaceholderMismatch
from mmstore_client.render import Rendered, Renderer, image_refs
from mmstore_client.rollouts import RolloutDoc, aput_rollout, rollout_turns
from mmstore_client.samples import Sample, sample_from_rendered

from .env import ShapesEnv
from .stats import LoopStats

SYSTEM = ShapesEnv.system


@dataclass
class Trajectory:
    rendered: Rendered
    logprobs: list[float]
    reward: float = 0.0
    texts: list[str] = field(default_factory=list)
    pixel_digests: list[str] = field(default_factory=list)  # of the last request: every image so far
    marks: list[tuple[int, int, int]] = field(default_factory=list)  # per turn: prompt, completion, end
    turn_rewards: list[float] = field(default_factory=list)
    ended: bool = False  # the next turn would not fit the context: the conversation stops here


class RolloutWorker:
    def __init__(
        self,
        store: AsyncStoreClient,
        inference: AsyncInferenceClient,
        renderer: Renderer,
        run: str,
        stats: LoopStats,
        sampling: SamplingOptions,
        *,
        upload_rollouts: bool = True,
        affinity: bool = True,
        max_model_len: int | None = None,
        env: type = ShapesEnv,
    ) -> None:
        self.env = env  # the environment class: ShapesEnv, ClickEnv (tools), ...
        # the inference context limit: a turn whose prompt plus max_tokens would not fit ends
        # its trajectory at the last complete turn (never a cut through an image), counted
        self.max_model_len = max_model_len
        self.store = store
        self.inference = inference
        self.renderer = renderer
        self.run = run
        self.stats = stats
        self.sampling = sampling
        self.upload_rollouts = upload_rollouts  # one RolloutDoc per trajectory, for the viewer
        # send the group's id as the affinity header: behind nginx, a group stays on one replica
        self.affinity = affinity
        self.rollout_docs = 0
        self.fetch_s: list[float] = []  # inference's timings.fetch_s, per generate request

    async def _offload(self, message: dict) -> dict:
        (out,) = await aoffload_messages([message], self.store, self.run)
        self.stats.images += 1
        return out

    async def _render(
        self, messages: list[dict], previous: Rendered | None = None, tools: list[dict] | None = None
    ) -> Rendered:
        """Fetch the new images' headers here, then render (or bridge) off the event loop."""
        headers = await self.store.image_headers(image_refs(messages))
        if previous is None:
            return await asyncio.to_thread(self.renderer.render, messages, headers, tools=tools)
        return await asyncio.to_thread(self.renderer.bridge, previous, messages, headers, tools=tools)

    def affinity_key(self, seed: int) -> str | None:
        return f"{self.run}/seed{seed}" if self.affinity else None

    async def _generate(self, rendered: Rendered, n: int, affinity: str | None = None):
        request = GenerateRequest(
            prompt_token_ids=rendered.token_ids,
            descriptors=rendered.descriptors,
            sampling=self.sampling.model_copy(update={"n": n}),
        )
        try:
            reject_processed(request.model_dump(mode="json"), "$request")
        except ProcessedPayloadError:
            self.stats.processed_payloads += 1
            raise
        sizes = {d.digest: len(self.store.cache.get(d.digest) or b"") for d in rendered.descriptors}
        self.stats.count_request(rendered.descriptors, sizes, self.renderer.layout)
        retried = self.inference.retried
        try:
            response = await self.inference.generate(request, affinity=affinity)
        except Exception as exc:
            self.stats.inference_errors += 1
            if isinstance(exc, PlaceholderMismatch) or (
                isinstance(exc, ConflictError) and exc.code == "placeholder_mismatch"
            ):
                self.stats.placeholder_mismatches += 1
            raise
        finally:
            self.stats.inference_retries += self.inference.retried - retried
        if response.prompt_token_ids != rendered.token_ids:
            self.stats.placeholder_mismatches += 1
            raise RuntimeError("inference ran a different prompt than the one rendered")
        self.fetch_s.append(response.timings.fetch_s)
        return response

    def _advance(self, traj: Trajectory, completion, env, k: int) -> None:
        text = self.renderer.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        prompt_start, completion_start = traj.marks[-1][2] if traj.marks else 0, len(traj.rendered.token_ids)
        traj.rendered = traj.rendered.extend(completion.token_ids, assistant=True)
        traj.rendered.messages.append({"role": "assistant", "content": text})
        traj.logprobs += completion.logprobs or [0.0] * len(completion.token_ids)
        reward = env.reward(env.turn(k), text)
        traj.reward += reward
        traj.texts.append(text)
        traj.marks.append((prompt_start, completion_start, len(traj.rendered.token_ids)))
        traj.turn_rewards.append(reward)

    async def rollout_group(self, seed: int, turns: int, n: int) -> list[Sample]:
        env = self.env(seed, turns, self.renderer.layout.family)
        first = await self._offload(env.message(env.turn(0), 0))
        rendered = await self._render([env.system, first], tools=env.tools)
        key = self.affinity_key(seed)  # every turn and sample of the group: one replica's caches
        response = await self._generate(rendered, n, key)
        trajectories = []
        for completion in response.samples:
            traj = Trajectory(rendered, [0.0] * len(rendered.token_ids), pixel_digests=response.pixel_digests)
            self._advance(traj, completion, env, 0)
            trajectories.append(traj)
        self.stats.turns += len(trajectories)
        for k in range(1, turns):
            message = await self._offload(env.message(env.turn(k), k))
            for traj in trajectories:
                if traj.ended:
                    continue
                prompt = await self._render([message], traj.rendered, env.tools)
                limit = self.max_model_len
                if limit is not None and len(prompt.token_ids) + self.sampling.max_tokens > limit:
                    traj.ended = True
                    self.stats.context_stops += 1
                    continue
                traj.logprobs += [0.0] * (len(prompt.token_ids) - len(traj.logprobs))
                traj.rendered = prompt
                response = await self._generate(prompt, 1, key)
                traj.pixel_digests = response.pixel_digests
                self._advance(traj, response.samples[0], env, k)
                self.stats.turns += 1
        samples = self._samples(seed, trajectories, turns)
        if self.upload_rollouts:
            await self._upload_rollouts(seed, trajectories, samples)
        return samples

    async def _upload_rollouts(
        self, seed: int, trajectories: list[Trajectory], samples: list[Sample]
    ) -> None:
        """Each trajectory's turns, text and images as a RolloutDoc in the store (the viewer's)."""

        def decode(ids: list[int]) -> str:
            return self.renderer.tokenizer.decode(ids, skip_special_tokens=False)

        docs = [
            RolloutDoc(
                rollout_id=sample.sample_id,
                step=seed,
                reward=sample.reward,
                descriptors=traj.rendered.descriptors,
                turns=rollout_turns(traj.rendered, traj.marks, decode, traj.turn_rewards),
                meta=sample.meta,
            )
            for traj, sample in zip(trajectories, samples, strict=True)
        ]
        await asyncio.gather(*(aput_rollout(self.store, self.run, doc) for doc in docs))
        self.rollout_docs += len(docs)

    def _samples(self, seed: int, trajectories: list[Trajectory], turns: int) -> list[Sample]:
        rewards = [t.reward / max(1, len(t.turn_rewards)) for t in trajectories]
        mean = statistics.fmean(rewards)
        std = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
        samples = []
        for i, (traj, reward) in enumerate(zip(trajectories, rewards, strict=True)):
            samples.append(
                sample_from_rendered(
                    traj.rendered,
                    sample_id=f"seed{seed}-{i}",
                    advantages=(reward - mean) / (std + 1e-6),
                    logprobs=traj.logprobs,
                    reward=reward,
                    pixel_digests=traj.pixel_digests,
                    meta={"seed": seed, "turns": turns},
                )
            )
            self.stats.rewards.append(reward)
            self.stats.digests.update(d.digest for d in traj.rendered.descriptors)
        self.stats.rollouts += len(samples)
        return samples
