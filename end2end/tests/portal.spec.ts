import { expect, test } from "@playwright/test";
import { card, enroll, enrollAt } from "./helpers";

test("the member page updates live when staff act on the member from another browser", async ({ browser, request }) => {
  const { id, position } = await enrollAt(request, "Live Tester");

  const memberContext = await browser.newContext();
  const portal = await memberContext.newPage();
  await portal.goto(`/members/${id}?min_position=${position}`);
  await expect(portal.getByRole("heading", { name: "Live Tester" })).toBeVisible();
  await expect(portal.getByTestId("points-balance")).toHaveText("0");
  await expect(portal.getByTestId("tier")).toHaveText("Bronze");
  // Hydrated and subscribed.
  await expect(portal.getByTestId("live-indicator")).toHaveText(/^Live$/);
  // Survives only if the page is never reloaded.
  await portal.evaluate(() => ((window as unknown as { marker: number }).marker = 42));

  const staffContext = await browser.newContext();
  const admin = await staffContext.newPage();
  await admin.goto("/admin");
  const earn = card(admin, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("1500");
  await earn.getByLabel("Reason").fill("Welcome gift");
  await earn.getByRole("button", { name: "Earn" }).click();

  await expect(portal.getByTestId("points-balance")).toHaveText("1,500");
  await expect(portal.getByTestId("tier")).toHaveText("Silver");
  await expect(portal.getByTestId("next-tier")).toHaveText("3,500 points to Gold");
  await expect(portal.getByText("Welcome gift")).toBeVisible();
  expect(await portal.evaluate(() => (window as unknown as { marker?: number }).marker)).toBe(42);

  // A purchase goes through the loyalty policy and shows up the same way.
  const purchase = card(admin, "Record a purchase");
  await purchase.getByLabel("Member id (empty: anonymous)").fill(id);
  await purchase.getByLabel("Amount").fill("40.00");
  await purchase.getByRole("button", { name: "Record purchase" }).click();
  await expect(portal.getByTestId("points-balance")).toHaveText("1,550"); // 40 × 1.25 at silver
  expect(await portal.evaluate(() => (window as unknown as { marker?: number }).marker)).toBe(42);

  await memberContext.close();
  await staffContext.close();
});

test("without JavaScript the member page renders and a staff form still works", async ({ browser, request }) => {
  const { id, position } = await enrollAt(request, "No Script");
  const context = await browser.newContext({ javaScriptEnabled: false });
  const page = await context.newPage();

  // Read-your-writes: without JavaScript nothing would update the page later.
  await page.goto(`/members/${id}?min_position=${position}`);
  await expect(page.getByRole("heading", { name: "No Script" })).toBeVisible();
  await expect(page.getByTestId("points-balance")).toHaveText("0");
  await expect(page.getByText("Joined the loyalty programme")).toBeVisible();

  await page.goto("/admin");
  const earn = card(page, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("250");
  await earn.getByRole("button", { name: "Earn" }).click();
  await page.waitForURL(/\/admin/);

  // The earn was acknowledged before the redirect; the projector may still be applying it, so
  // look again until it shows (without JavaScript the page cannot update itself).
  await expect(async () => {
    await page.goto(`/members/${id}`);
    await expect(page.getByTestId("points-balance")).toHaveText("250", { timeout: 1_000 });
  }).toPass({ timeout: 10_000 });

  // An error comes back in words too, after the redirect.
  await page.goto("/admin");
  const redeem = card(page, "Redeem points");
  await redeem.getByLabel("Member id").fill(id);
  await redeem.getByLabel("Points").fill("999");
  await redeem.getByRole("button", { name: "Redeem" }).click();
  await expect(card(page, "Redeem points").getByRole("alert")).toContainText("not enough points");
  // Every form's action sees the error the page came back with; only the redeem form shows it.
  await expect(page.getByRole("alert")).toHaveCount(1);
  await context.close();
});

test("invalid form input shows its error message next to the form", async ({ page, request }) => {
  const id = await enroll(request, "Error Shown");
  await page.goto("/admin");
  const earn = card(page, "Earn points");
  await earn.getByLabel("Member id").fill(id);
  await earn.getByLabel("Points").fill("0");
  await earn.getByRole("button", { name: "Earn" }).click();
  await expect(earn.getByRole("alert")).toContainText("points must be between 1 and 1000000");

  const enrollCard = card(page, "Enroll a member");
  await enrollCard.getByLabel("Name").fill("Someone");
  await enrollCard.getByLabel("Email").fill(`${id}@example.com`); // already taken
  await enrollCard.getByRole("button", { name: "Enroll" }).click();
  await expect(enrollCard.getByRole("alert")).toContainText("already used by another member");
});

test("staff can find a member by name and open the portal", async ({ page, request }) => {
  const id = await enroll(request, "Searchable Person");
  await page.goto("/admin");
  await page.getByRole("searchbox", { name: "Search by name or email" }).fill(id);
  await page.getByRole("button", { name: "Search" }).click();
  await page.getByRole("link", { name: "Searchable Person" }).click();
  await expect(page).toHaveURL(new RegExp(`/members/${id}$`));
  await expect(page.getByRole("heading", { name: "Searchable Person" })).toBeVisible();
});
