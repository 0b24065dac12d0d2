/**
 * The guest's side of the lab's virtio-balloon device (VmConfig.balloon): which driver the guest bound to it and
 * which features the two negotiated, read from the guest's sysfs through the agent.
 */
import type { GuestAgent } from "./guest-agent.ts";

/** virtio device ID of the memory balloon (virtio spec 1.2, §5 "Device Types"). */
const VIRTIO_ID_BALLOON = "0x0005";
/** Feature bits, include/uapi/linux/virtio_balloon.h. */
export const VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3;

export interface GuestBalloon {
  /** sysfs name of the virtio device, e.g. "virtio2". */
  device: string;
  /** The driver bound to it ("virtio_balloon"), or null when none is. */
  driver: string | null;
  /** Negotiated features: sysfs `features` is one '0'/'1' per bit, bit 0 first. */
  features: string;
  freePageHint: boolean;
}

/** The guest's balloon device, or null when the guest sees none. */
export async function guestBalloon(agent: GuestAgent): Promise<GuestBalloon | null> {
  const out = await agent.run(
    `for d in /sys/bus/virtio/devices/*; do [ "$(cat "$d/device")" = ${VIRTIO_ID_BALLOON} ] || continue; ` +
      `echo "\${d##*/} $(readlink "$d/driver" || echo -) $(cat "$d/features")"; done`,
  );
  const line = out.split("\n").find((l) => l.trim() !== "");
  if (!line) return null;
  const [device = "", driverLink = "-", features = ""] = line.trim().split(/\s+/);
  const driver = driverLink === "-" ? null : driverLink.slice(driverLink.lastIndexOf("/") + 1);
  return { device, driver, features, freePageHint: features[VIRTIO_BALLOON_F_FREE_PAGE_HINT] === "1" };
}
