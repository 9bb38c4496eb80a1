import { APIRequestContext, Browser, BrowserContext, expect, Page, request } from "@playwright/test";

let counter = 0;

/** A name no other test uses, so tests never depend on each other's data. */
export function unique(prefix: string): string {
  return `${prefix}-${Date.now().toString(36)}-${process.pid}-${counter++}`;
}

export const PASSWORD = "a long enough password";

/** The REST API as an admin key (made by scripts/e2e with `tally keys create`). */
export async function adminApi(): Promise<APIRequestContext> {
  const token = process.env.TALLY_E2E_ADMIN_KEY;
  if (!token) throw new Error("TALLY_E2E_ADMIN_KEY is not set: run the browser tests with scripts/e2e");
  return request.newContext({
    baseURL: process.env.BASE_URL ?? "http://127.0.0.1:3000",
    extraHTTPHeaders: { Authorization: `Bearer ${token}` },
  });
}

/** A member enrolled by staff (no account yet). Returns its id and the position of its enrolment
 *  (for read-your-writes: `/members/{id}?min_position=…`). */
export async function enrollAt(api: APIRequestContext, name: string): Promise<{ id: string; position: number }> {
  const id = unique("e2e");
  const response = await api.post("/api/members", { data: { member_id: id, name, email: `${id}@example.com` } });
  expect(response.status()).toBe(201);
  return { id, position: (await response.json()).position };
}

export async function enroll(api: APIRequestContext, name: string): Promise<string> {
  return (await enrollAt(api, name)).id;
}

/** Join from the home page, as a visitor would; lands on the new member's own page. */
export async function join(page: Page, name: string): Promise<{ id: string; email: string }> {
  const email = `${unique("joiner")}@example.com`;
  await page.goto("/");
  const form = card(page, "Join");
  await form.getByLabel("Your name").fill(name);
  await form.getByLabel("Email").fill(email);
  await form.getByLabel(/Password/).fill(PASSWORD);
  await form.getByRole("button", { name: "Join" }).click();
  await page.waitForURL(/\/members\/[^/?]+/);
  const id = new URL(page.url()).pathname.split("/").pop()!;
  return { id, email };
}

/** Sign in from the card titled `title` on the current page. */
export async function signIn(page: Page, email: string, password = PASSWORD, title = "Sign in") {
  const form = card(page, title);
  await form.getByLabel("Email").fill(email);
  await form.getByLabel("Password").fill(password);
  await form.getByRole("button", { name: "Sign in" }).click();
}

/** Use an access link: set the password, which signs in. */
export async function claim(page: Page, url: string, password = PASSWORD) {
  await page.goto(url);
  await page.getByLabel("New password").fill(password);
  await page.getByRole("button", { name: "Set password and sign in" }).click();
}

/** A person with a staff account, signed in (through the access link an admin's account
 *  creation gives) in a browser context of their own. */
export async function staffContext(
  browser: Browser,
  api: APIRequestContext,
  options: { javaScriptEnabled?: boolean } = {},
): Promise<{ context: BrowserContext; page: Page; email: string }> {
  const email = `${unique("staff")}@tally.example`;
  const made = await api.post("/api/users", { data: { email, name: "Sam Staff", role: "staff" } });
  expect(made.status()).toBe(201);
  const link = (await made.json()).access_link.url as string;
  const context = await browser.newContext(options);
  const page = await context.newPage();
  await claim(page, link);
  await page.waitForURL(/\/admin$/);
  return { context, page, email };
}

/** The card (a titled section) whose heading is `title`. */
export function card(page: Page, title: string) {
  return page.locator("section.card", { has: page.getByRole("heading", { name: title, exact: true }) });
}
